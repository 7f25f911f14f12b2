"""The planner's arithmetic: from measured device and link figures to predicted
seconds, device joules and bytes of each way to train (no network, no clock).

Bytes come from real messages: every kind of call a run makes is built as the
edge's client would build it (the session's codec, ``codec.pack``) and sized as
the client counts it (``ByteSize`` + the 5-byte gRPC frame). Which kind each step
is follows the trainer's own rule (``EdgeTrainer._exchange``): with the cloud's
teacher-output cache a sample's teacher activations and label travel once, later
steps carry sample ids and student activations only. Joules follow the run
report's estimate (``edge_agent.telemetry``): the same ``EnergyMeter`` fed with
the predicted compute, waits and transfers of every step, the other calls as one
transfer at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitkd import codec, codecs, energy, serde
from splitkd.hyper import Hyperparameters
from splitkd.messages import SessionInfo
from splitkd.models.spec import ModelSpec
from splitkd.training import batch_order
from splitkd.v1 import splitkd_pb2 as pb

FRAME = 5  # gRPC's length prefix, as edge_agent/client.py counts it
EVAL_BATCH = 256  # EdgeTrainer._heldout_accuracy's batch
# Codecs a plan considers, most faithful first (int8-stochastic costs what int8 costs).
PLAN_CODECS = ("float32", "float16", "int8", "topk")
# A codec that loses information is only chosen when it saves more than this share
# of the objective over a more faithful one.
FIDELITY_MARGIN = 0.02
# Messages around a federated round besides the weights (task, update, answers).
ROUND_OVERHEAD_BYTES = 400
# Register's request: ids, profile names, the signature, the ask (measured: ~150 bytes).
REGISTER_UP_BYTES = 155


@dataclass(frozen=True)
class Stage:
    """Device seconds per batch of ``batch_size`` at one cut, and what the cut sends."""

    forward: float
    backward: float  # backward + optimizer step (0 for the frozen teacher head)
    activation_shape: tuple[int, ...]  # one sample's
    tail_seconds: float  # the cloud's side per batch (timed on this device)
    peak_memory_bytes: int
    head_state: dict[str, np.ndarray] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class DeviceFigures:
    batch_size: int
    student: dict[int, Stage]  # by student cut
    teacher: dict[int, Stage]  # by teacher cut
    whole_student: Stage  # federated: the whole student trained here
    wire_seconds: dict[tuple[int, str], float]  # (cut, codec): pack + parse of one step
    onnx_bytes: int
    student_state: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    # (cut, codec): the cloud's own step timed here, (teacher side cached, sent); empty
    # without the cloud's package: the tails' arithmetic stands in.
    cloud_seconds: dict[tuple[int, str], tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class LinkFigures:
    rtt: float  # seconds, a tiny call's round trip
    up_bytes_per_second: float
    down_bytes_per_second: float

    def seconds(self, up: int, down: int, calls: int = 1) -> float:
        return calls * self.rtt + up / self.up_bytes_per_second + down / self.down_bytes_per_second


@dataclass(frozen=True)
class Workload:
    """What the run would train: this device's data and the cloud's settings."""

    train_samples: int
    heldout_samples: int
    hyper: Hyperparameters
    student_spec: ModelSpec
    teacher_spec: ModelSpec
    teacher_cut: int
    cache_samples: int  # the cloud's per-session teacher-cache limit
    local_epochs: int = 2  # federated: device epochs per round (the fleet's default)
    eval_every: int = 1  # held-out evaluations through the split (train --eval-every)

    def evaluates(self, epoch: int) -> bool:
        """As EdgeTrainer: every eval_every epochs, and after the last."""
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.hyper.epochs

    @property
    def evaluations(self) -> int:
        return sum(self.evaluates(e) for e in range(self.hyper.epochs))

    @property
    def cached(self) -> bool:
        return 0 < self.train_samples <= self.cache_samples

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_samples / self.hyper.batch_size)


@dataclass(frozen=True)
class Candidate:
    mode: str  # "split" or "federated"
    student_cut: int = 0
    teacher_cut: int = 0
    wire_codec: str = ""

    @property
    def name(self) -> str:
        if self.mode == "federated":
            return "federated"
        return f"split cut {self.student_cut}/{self.teacher_cut} {self.wire_codec}"

    @property
    def runnable_alone(self) -> bool:
        """Federated needs a cohort (``train --cohort``); a split run trains alone."""
        return self.mode == "split"


@dataclass
class Prediction:
    seconds: float  # the training loop: steps and per-epoch evaluation
    joules: float  # the run report's device estimate
    bytes_up: int
    bytes_down: int
    epoch_seconds: float
    epoch_joules: float
    epoch_bytes: int
    peak_memory_bytes: int
    step_calls: int

    @property
    def bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "joules": self.joules,
            "bytes": self.bytes,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "epoch": {
                "seconds": self.epoch_seconds,
                "joules": self.epoch_joules,
                "bytes": self.epoch_bytes,
            },
            "peak_memory_bytes": self.peak_memory_bytes,
            "round_trips": self.step_calls,
        }

    def objective(self, name: str) -> float:
        return {"time": self.seconds, "energy": self.joules, "bytes": float(self.bytes)}[name]


# -- step kinds -------------------------------------------------------------------


@dataclass(frozen=True)
class StepKind:
    batch: int
    teacher: int  # samples whose teacher activations go with the step
    ahead: int  # samples of the next batch whose teacher activations go ahead
    fresh: bool  # labels travel (and the cloud runs the teacher tail)
    ids: bool


def step_kinds(workload: Workload) -> list[StepKind]:
    """Every step of the run, in order, as ``EdgeTrainer._exchange`` sends it."""
    hyper, n = workload.hyper, workload.train_samples
    schedule = [
        index
        for epoch in range(hyper.epochs)
        for index in batch_order(n, hyper.batch_size, hyper.seed, epoch)
    ]
    cached = np.zeros(n, dtype=bool) if workload.cached else None
    sent_ahead = False
    kinds = []
    for step, index in enumerate(schedule):
        following = schedule[step + 1] if step + 1 < len(schedule) else None
        held = cached is not None and bool(cached[index].all())
        teacher = 0 if held or sent_ahead else len(index)
        next_held = following is None or (
            cached is not None and bool((cached[following] | np.isin(following, index)).all())
        )
        ahead = 0 if next_held or following is None else len(following)
        kinds.append(StepKind(len(index), teacher, ahead, not held, cached is not None))
        if cached is not None and not held:
            cached[index] = True
        # The cloud keeps what goes ahead when it is at most a batch (always here).
        sent_ahead = ahead > 0
    return kinds


# -- message sizes ----------------------------------------------------------------


class Wire:
    """Sizes of the messages of one session (codec, cuts), built as the client builds them."""

    def __init__(
        self,
        codec_name: str,
        hyper: Hyperparameters,
        student: tuple[int, ...],
        teacher: tuple[int, ...],
        classes: int,
    ) -> None:
        self.name = codec_name
        self.ratio = hyper.topk_ratio
        self.student_shape, self.teacher_shape, self.classes = student, teacher, classes
        self._sizes: dict[StepKind, tuple[int, int]] = {}

    def _packed(self, name: str, shape: tuple[int, ...], batch: int) -> pb.Tensor:
        values = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        made = codecs.make(name, topk_ratio=self.ratio)
        return codec.pack(made.encode(values, np.arange(batch, dtype=np.int32)))

    def step(self, kind: StepKind, step_number: int = 1000) -> tuple[int, int]:
        if kind not in self._sizes:
            once = codecs.evaluation_codec(self.name)
            request = pb.StepRequest(
                session_id="0" * 32,
                step=step_number,
                student_activations=self._packed(self.name, self.student_shape, kind.batch),
            )
            if kind.fresh:
                request.labels.CopyFrom(codec.encode(np.zeros(kind.batch, dtype=np.int64)))
            if kind.teacher:
                request.teacher_activations.CopyFrom(
                    self._packed(once, self.teacher_shape, kind.teacher)
                )
            if kind.ahead:
                request.next_teacher_activations.CopyFrom(
                    self._packed(once, self.teacher_shape, kind.ahead)
                )
            if kind.ids:
                request.sample_ids.CopyFrom(codec.encode(np.zeros(kind.batch, dtype=np.int32)))
            reply = pb.StepResponse(
                step=step_number,
                gradient=self._packed(self.name, self.student_shape, kind.batch),
                loss=1.5,
                kd_loss=1.5,
                ce_loss=1.5,
                correct=kind.batch // 2,
                next_teacher_accepted=kind.ahead > 0,
            )
            self._sizes[kind] = (request.ByteSize() + FRAME, reply.ByteSize() + FRAME)
        return self._sizes[kind]

    def evaluate(self, batch: int, *, teacher: bool) -> tuple[int, int]:
        shape = self.teacher_shape if teacher else self.student_shape
        tensor = self._packed(codecs.evaluation_codec(self.name), shape, batch)
        field_name = "teacher_activations" if teacher else "student_activations"
        request = pb.EvaluateRequest(session_id="0" * 32, **{field_name: tensor})
        logits = codec.encode(np.zeros((batch, self.classes), dtype=np.float32), pb.DTYPE_FLOAT32)
        return request.ByteSize() + FRAME, pb.EvaluateResponse(logits=logits).ByteSize() + FRAME


def evaluation_batches(samples: int) -> list[int]:
    return [min(EVAL_BATCH, samples - start) for start in range(0, samples, EVAL_BATCH)]


def session_bytes(
    workload: Workload, device: DeviceFigures, candidate: Candidate
) -> tuple[int, int]:
    """Register (the heads' weights come down), Finish (the head goes up) and the download."""
    student = device.student[candidate.student_cut]
    teacher = device.teacher[candidate.teacher_cut]
    info = SessionInfo(
        session_id="0" * 32,
        student_spec=workload.student_spec,
        teacher_spec=workload.teacher_spec,
        student_cut=candidate.student_cut,
        teacher_cut=candidate.teacher_cut,
        student_head=student.head_state,
        teacher_head=teacher.head_state,
        hyper=workload.hyper,
        next_step=0,
        model_name="student-" + "d" * 16,
        teacher_accuracy=0.9,
        teacher_cache_samples=workload.train_samples if workload.cached else 0,
    )
    register_down = serde.session_to_pb(info).ByteSize() + FRAME
    finish_up = pb.FinishRequest(
        session_id="0" * 32, student_head=codec.encode_weights(student.head_state), steps=1000
    ).ByteSize()
    # Finish's answer (ModelInfo) and the download's chunk headers.
    small_up, small_down = 200, 300
    return (
        REGISTER_UP_BYTES + finish_up + small_up,
        register_down + device.onnx_bytes + small_down,
    )


# -- predictions ------------------------------------------------------------------


def predict_split(
    workload: Workload,
    device: DeviceFigures,
    link: LinkFigures,
    candidate: Candidate,
    profile: tuple[energy.DeviceProfile, energy.LinkProfile],
) -> Prediction:
    student = device.student[candidate.student_cut]
    teacher = device.teacher[candidate.teacher_cut]
    wire = Wire(
        candidate.wire_codec,
        workload.hyper,
        student.activation_shape,
        teacher.activation_shape,
        workload.student_spec.num_classes,
    )
    per_sample = 1.0 / device.batch_size
    wire_cpu = device.wire_seconds[(candidate.student_cut, candidate.wire_codec)] * per_sample
    meter = energy.EnergyMeter(*profile)
    clock = seconds = 0.0
    up_total = down_total = 0
    epoch_marks: list[tuple[float, float, int]] = []
    kinds = step_kinds(workload)
    per_epoch = workload.steps_per_epoch
    for number, kind in enumerate(kinds):
        up, down = wire.step(kind, number)
        forward = (
            (student.forward + teacher.forward * (kind.teacher + kind.ahead) / kind.batch)
            * kind.batch
            * per_sample
        )
        cloud = _cloud_seconds(device, candidate, kind.fresh) * kind.batch * per_sample
        network = link.seconds(up, down) + cloud + wire_cpu * kind.batch
        backward = student.backward * kind.batch * per_sample
        # As telemetry.on_step books it: compute, the wait, the transfer ending before backward.
        meter.compute(forward + backward)
        meter.wait(network)
        clock += forward + network
        meter.transfer(up, down, clock - network, clock)
        clock += backward
        seconds += forward + network + backward
        up_total, down_total = up_total + up, down_total + down
        if (number + 1) % per_epoch == 0:
            if workload.evaluates(number // per_epoch):
                seconds += _evaluation_seconds(workload, device, link, wire, candidate)
            epoch_marks.append((seconds, meter.totals.total, up_total + down_total))
    other_up, other_down = _other_calls(workload, device, wire, candidate)
    meter.transfer(other_up, other_down, clock, clock)
    meter.close()
    first = epoch_marks[0] if epoch_marks else (seconds, meter.totals.total, up_total + down_total)
    later = _later_epoch(epoch_marks) or first
    return Prediction(
        seconds=seconds,
        joules=meter.totals.total,
        bytes_up=up_total + other_up,
        bytes_down=down_total + other_down,
        epoch_seconds=later[0],
        epoch_joules=later[1],
        epoch_bytes=int(later[2]),
        peak_memory_bytes=student.peak_memory_bytes + teacher.peak_memory_bytes,
        step_calls=len(kinds),
    )


def _cloud_seconds(device: DeviceFigures, candidate: Candidate, fresh: bool) -> float:
    """The cloud's part of a step of a full batch."""
    timed = device.cloud_seconds.get((candidate.student_cut, candidate.wire_codec))
    if timed is not None:
        return timed[1] if fresh else timed[0]
    teacher = device.teacher[candidate.teacher_cut].tail_seconds if fresh else 0.0
    return device.student[candidate.student_cut].tail_seconds + teacher


def _later_epoch(marks: list[tuple[float, float, int]]) -> tuple[float, float, int] | None:
    """A typical epoch after the first (the first sends the teacher's side too)."""
    if len(marks) < 2:
        return None
    last, before = marks[-1], marks[-2]
    return (last[0] - before[0], last[1] - before[1], last[2] - before[2])


def _evaluation_seconds(
    workload: Workload, device: DeviceFigures, link: LinkFigures, wire: Wire, candidate: Candidate
) -> float:
    student = device.student[candidate.student_cut]
    total = 0.0
    for batch in evaluation_batches(workload.heldout_samples):
        up, down = wire.evaluate(batch, teacher=False)
        total += link.seconds(up, down) + student.forward * batch / device.batch_size
    return total


def _other_calls(
    workload: Workload, device: DeviceFigures, wire: Wire, candidate: Candidate
) -> tuple[int, int]:
    """Bytes outside the steps: evaluations (teacher once, student each epoch) and the session."""
    up = down = 0
    for batch in evaluation_batches(workload.heldout_samples):
        for teacher, times in ((True, 1), (False, workload.evaluations)):
            call_up, call_down = wire.evaluate(batch, teacher=teacher)
            up, down = up + times * call_up, down + times * call_down
    session_up, session_down = session_bytes(workload, device, candidate)
    return up + session_up, down + session_down


def predict_federated(
    workload: Workload,
    device: DeviceFigures,
    link: LinkFigures,
    profile: tuple[energy.DeviceProfile, energy.LinkProfile],
) -> Prediction:
    """The whole student trained here; its weights come down and go up once per round."""
    weights = codec.encode_weights(device.student_state).ByteSize() + ROUND_OVERHEAD_BYTES
    rounds = math.ceil(workload.hyper.epochs / workload.local_epochs)
    whole = device.whole_student
    local = (
        workload.local_epochs
        * workload.train_samples
        / device.batch_size
        * (whole.forward + whole.backward)
    )
    meter = energy.EnergyMeter(*profile)
    clock = 0.0
    for _ in range(rounds):
        down_seconds = link.seconds(0, weights)
        meter.wait(down_seconds)
        meter.transfer(0, weights, clock, clock + down_seconds)
        clock += down_seconds
        meter.compute(local)
        clock += local
        up_seconds = link.seconds(weights, 0)
        meter.wait(up_seconds)
        meter.transfer(weights, 0, clock, clock + up_seconds)
        clock += up_seconds
    meter.close()
    per_round = link.seconds(weights, weights, calls=2) + local
    return Prediction(
        seconds=clock,
        joules=meter.totals.total,
        bytes_up=rounds * weights,
        bytes_down=rounds * weights + device.onnx_bytes,
        epoch_seconds=per_round / workload.local_epochs,
        epoch_joules=meter.totals.total / max(1, workload.hyper.epochs),
        epoch_bytes=int(2 * weights / workload.local_epochs),
        peak_memory_bytes=whole.peak_memory_bytes,
        step_calls=2 * rounds,
    )


def candidates(
    workload: Workload, device: DeviceFigures, codec_names: tuple[str, ...]
) -> list[Candidate]:
    offered = [name for name in PLAN_CODECS if name in codec_names]
    split = [
        Candidate("split", cut, workload.teacher_cut, name)
        for cut in sorted(device.student)
        for name in offered
    ]
    return [*split, Candidate("federated")]


def predict(
    candidate: Candidate,
    workload: Workload,
    device: DeviceFigures,
    link: LinkFigures,
    profile: tuple[energy.DeviceProfile, energy.LinkProfile],
) -> Prediction:
    if candidate.mode == "federated":
        return predict_federated(workload, device, link, profile)
    return predict_split(workload, device, link, candidate, profile)


def choose(
    predictions: list[tuple[Candidate, Prediction]], objective: str, *, alone: bool = False
) -> tuple[Candidate, Prediction]:
    """The best candidate for ``objective``; a lossier codec must beat a more faithful one
    by ``FIDELITY_MARGIN``. ``alone``: only what trains without a cohort."""
    pool = [(c, p) for c, p in predictions if c.runnable_alone or not alone]
    best = min(p.objective(objective) for _, p in pool)
    good = [(c, p) for c, p in pool if p.objective(objective) <= best * (1 + FIDELITY_MARGIN)]
    return min(good, key=lambda cp: (_fidelity(cp[0]), cp[1].objective(objective)))


def _fidelity(candidate: Candidate) -> int:
    if candidate.mode == "federated":
        return 0
    return PLAN_CODECS.index(candidate.wire_codec)
