"""What the planner measures: this device's compute at each cut, and the real link.

Models are built from the cloud's specs (``Describe``); their weights do not
matter for timing. Each figure is the mean of a few repetitions after a warm-up,
per batch of the session's batch size. The cloud's side of a step is timed here
too (the cloud is usually faster: an upper bound). Peak memory is counted from
the tensors a training step really holds: parameters, their gradients and Adam's
two moments, and every stage's output with its gradient.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from edge_agent.client import CloudClient
from edge_agent.plan_model import PLAN_CODECS, DeviceFigures, LinkFigures, Stage
from splitkd import codec, codecs
from splitkd.hyper import Hyperparameters
from splitkd.kd import kd_loss
from splitkd.messages import SessionAsk, TaskDescription
from splitkd.models import zoo
from splitkd.models.staged import StagedModel
from splitkd.onnx_export import export_onnx
from splitkd.signature import DatasetSignature
from splitkd.training import make_optimizer
from splitkd.v1 import splitkd_pb2 as pb

REPEATS = 5  # per block
BLOCKS = 5
WARMUP = 3
PROBES = 3  # per block
# A throughput probe should take long against the round trip; it starts at 64 KiB
# and grows (to 1 MiB, well within any message limit) until it takes 50 ms on the wire.
FIRST_PROBE_BYTES = 64 << 10
LAST_PROBE_BYTES = 1 << 20
PROBE_WIRE_SECONDS = 0.05


def mean_seconds(work: Callable[[], object], repeats: int = REPEATS) -> float:
    """The median of block means after a warm-up. A run's total is a sum, so the busy
    machine's usual slow-downs belong in the figure (a median of single calls would drop
    them); one stall of the whole process (another job's burst) must not (a plain mean
    would count it)."""
    for _ in range(WARMUP):
        work()
    means = []
    for _ in range(BLOCKS):
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        means.append((time.perf_counter() - started) / repeats)
    return statistics.median(means)


def _training_seconds(
    part: nn.Module, inputs: torch.Tensor, hyper: Hyperparameters, loss: bool = False
) -> tuple[float, float]:
    """(forward, backward + optimizer step) seconds of ``part`` on ``inputs``; ``loss``:
    the forward ends in the KD loss, as the cloud's tail (and a federated student) does."""
    optimizer = make_optimizer(part.parameters(), hyper)
    labels = torch.zeros(inputs.shape[0], dtype=torch.long)

    def forward() -> torch.Tensor:
        out = part(inputs)
        if loss:
            out = kd_loss(out, out.detach(), labels, hyper.kd_alpha, hyper.kd_temperature).total
        return out

    forward_seconds = mean_seconds(forward)

    def step() -> None:
        out = forward()
        optimizer.zero_grad()
        out.backward(torch.ones_like(out))
        optimizer.step()

    return forward_seconds, max(0.0, mean_seconds(step) - forward_seconds)


@torch.no_grad()
def _frozen_seconds(part: nn.Module, inputs: torch.Tensor) -> float:
    return mean_seconds(lambda: part(inputs))


def _memory(model: StagedModel, start: int, stop: int, inputs: torch.Tensor, trained: bool) -> int:
    parameters = sum(p.numel() for s in model.stages[start:stop] for p in s.parameters())
    outputs = 0
    x = inputs
    with torch.no_grad():
        for stage in model.stages[start:stop]:
            x = stage(x)
            outputs += x.numel()
    # Trained: weights, gradients, Adam's two moments; each output and its gradient.
    return 4 * (parameters * (4 if trained else 1) + outputs * (2 if trained else 1))


def _tail_seconds(
    model: StagedModel, cut: int, activations: torch.Tensor, hyper: Hyperparameters | None
) -> float:
    """The cloud's side: the frozen teacher's tail (``hyper`` None), or the student's
    tail forward, KD loss, backward and optimizer step."""
    tail = model.part(cut, len(model.stages))
    if hyper is None:
        return _frozen_seconds(tail, activations)
    inputs = activations.detach().requires_grad_()
    forward, backward = _training_seconds(tail, inputs, hyper, loss=True)
    return forward + backward


def measure_device(
    task: TaskDescription, hyper: Hyperparameters, teacher_cut: int
) -> DeviceFigures:
    batch = hyper.batch_size
    student = zoo.build(task.student_spec, hyper.seed)
    teacher = zoo.build(task.teacher_spec, hyper.seed)
    teacher.requires_grad_(False)
    teacher.eval()
    inputs = torch.randn(batch, *task.student_spec.input_shape)
    students = {}
    for cut in task.student_cuts:
        head = student.part(0, cut)
        forward, backward = _training_seconds(head, inputs, hyper)
        with torch.no_grad():
            activations = head(inputs)
        students[cut] = Stage(
            forward=forward,
            backward=backward,
            activation_shape=tuple(activations.shape[1:]),
            tail_seconds=_tail_seconds(student, cut, activations, hyper),
            peak_memory_bytes=_memory(student, 0, cut, inputs, trained=True),
            head_state=student.part_state(0, cut),
        )
    teachers = {}
    for cut in task.teacher_cuts:
        head = teacher.part(0, cut)
        with torch.no_grad():
            activations = head(inputs)
        teachers[cut] = Stage(
            forward=_frozen_seconds(head, inputs),
            backward=0.0,
            activation_shape=tuple(activations.shape[1:]),
            tail_seconds=_tail_seconds(teacher, cut, activations, None),
            peak_memory_bytes=_memory(teacher, 0, cut, inputs, trained=False),
            head_state=teacher.part_state(0, cut),
        )
    whole_forward, whole_backward = _training_seconds(student, inputs, hyper, loss=True)
    whole = Stage(
        whole_forward,
        whole_backward,
        (task.student_spec.num_classes,),
        0.0,
        _memory(student, 0, len(student.stages), inputs, trained=True),
    )
    wire = {
        (cut, name): _wire_seconds(name, hyper, (batch, *students[cut].activation_shape))
        for cut in task.student_cuts
        for name in codecs.CODECS
    }
    return DeviceFigures(
        batch_size=batch,
        student=students,
        teacher=teachers,
        whole_student=whole,
        wire_seconds=wire,
        onnx_bytes=len(export_onnx(zoo.build(task.student_spec), task.student_spec.input_shape)),
        student_state=student.part_state(0, len(student.stages)),
    )


def _wire_seconds(name: str, hyper: Hyperparameters, shape: tuple[int, ...]) -> float:
    """CPU seconds of one step's packing on both sides: activations up, gradient down."""
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ids = np.arange(shape[0], dtype=np.int32)
    made = codecs.make(name, topk_ratio=hyper.topk_ratio)

    def round_trip() -> None:
        for _ in range(2):  # activations up, the gradient down
            message = pb.Tensor.FromString(codec.pack(made.encode(values, ids)).SerializeToString())
            made.decode(codec.unpack(message, what="planner", shape=(None, *shape[1:])))

    return mean_seconds(round_trip, repeats=3)


def measure_link(client: CloudClient) -> LinkFigures:
    """Round-trip time from tiny probes (as the device's timings: block means, their
    median), throughput each way from large ones (medians: one slow probe must not halve it)."""
    rtt = mean_seconds(lambda: client.probe(0, 0), repeats=PROBES)
    up = _throughput(lambda size: client.probe(size, 0), rtt)
    down = _throughput(lambda size: client.probe(0, size), rtt)
    return LinkFigures(rtt=rtt, up_bytes_per_second=up, down_bytes_per_second=down)


def _throughput(probe: Callable[[int], float], rtt: float) -> float:
    size = FIRST_PROBE_BYTES
    while True:
        seconds = statistics.median(probe(size) for _ in range(3))
        wire = seconds - rtt
        if wire >= PROBE_WIRE_SECONDS or size >= LAST_PROBE_BYTES:
            return size / max(wire, 1e-6)
        size = min(LAST_PROBE_BYTES, size * 4)


def calibrate(
    client: CloudClient,
    signature: DatasetSignature,
    device_id: str,
    task: TaskDescription,
    hyper: Hyperparameters,
    teacher_cut: int,
    link: LinkFigures,
    device: DeviceFigures,
) -> DeviceFigures:
    """``device`` with the cloud's side of a step and the heads' step compute as a real run
    sees them, per cut.

    A throwaway session per cut trains ``checkpoint_every + 1`` steps on random inputs
    (nothing of this device's data; one durable checkpoint is in the mean) with the head
    forward and backward in between, as a run interleaves them: a channel that idles
    between calls, and a head that runs between calls, are slower than either back to back.
    Each step's round trip less what the link takes for its bytes is the cloud's time; the
    heads' time is their time in the loop. The codec changes the bytes (predicted from the
    messages) far more than the arithmetic, so float32 stands for every codec at a cut.
    """
    cloud: dict[tuple[int, str], tuple[float, float]] = {}
    students = dict(device.student)
    for cut in task.student_cuts:
        timed = _calibrate_cut(client, signature, device_id, task, hyper, cut, teacher_cut, link)
        for name in PLAN_CODECS:
            cloud[(cut, name)] = (timed.cached, timed.fresh)
        students[cut] = replace(students[cut], forward=timed.forward, backward=timed.backward)
    return replace(device, cloud_seconds=cloud, student=students)


@dataclass(frozen=True)
class Calibration:
    cached: float  # the cloud's side of a step whose teacher outputs it holds
    fresh: float  # ... of a step that sends them
    forward: float  # the head's forward and packing, in the loop
    backward: float  # its backward and optimizer step, in the loop


def _calibrate_cut(
    client: CloudClient,
    signature: DatasetSignature,
    device_id: str,
    task: TaskDescription,
    hyper: Hyperparameters,
    cut: int,
    teacher_cut: int,
    link: LinkFigures,
) -> Calibration:
    batch = hyper.batch_size
    ask = SessionAsk("float32", 2 * batch, cut, teacher_cut)
    session = client.register(device_id, signature, ask=ask)
    rng = np.random.default_rng(0)
    # A short training run on random inputs, as a real one interleaves device work with
    # the calls (a channel that idles between calls is slower than one called back to back).
    head = zoo.build(task.student_spec, hyper.seed).part(0, cut)
    optimizer = make_optimizer(head.parameters(), hyper)
    teacher_head = zoo.build(task.teacher_spec, hyper.seed).part(0, teacher_cut).eval()
    wire = codecs.make("float32")
    labels = rng.integers(0, task.student_spec.num_classes, batch)
    fresh: list[float] = []
    cached: list[float] = []
    forward: list[float] = []
    backward: list[float] = []
    for step in range(hyper.checkpoint_every + 1):
        shape = (batch, *task.student_spec.input_shape)
        inputs = torch.from_numpy(rng.random(shape, dtype=np.float32))
        begun = time.perf_counter()
        activations = head(inputs)
        packed = wire.encode(activations.detach().numpy())
        forward.append(time.perf_counter() - begun)
        ids = np.arange(batch, dtype=np.int32) + (batch if step == 1 else 0)
        teacher = None
        if step < 2:
            with torch.no_grad():
                teacher = wire.encode(teacher_head(inputs).numpy())
        before = (client.traffic.bytes_up, client.traffic.bytes_down)
        started = time.perf_counter()
        reply = client.step(
            session.session_id,
            step,
            packed,
            teacher,
            labels if step < 2 else None,
            sample_ids=ids,
        )
        seconds = time.perf_counter() - started
        optimizer.zero_grad()
        activations.backward(torch.from_numpy(reply.gradient))
        optimizer.step()
        backward.append(time.perf_counter() - started - seconds)
        up, down = client.traffic.bytes_up - before[0], client.traffic.bytes_down - before[1]
        (fresh if step < 2 else cached).append(max(0.0, seconds - link.seconds(up, down)))
    return Calibration(
        statistics.fmean(cached),
        statistics.fmean(fresh),
        statistics.fmean(forward[2:]),
        statistics.fmean(backward[2:]),
    )
