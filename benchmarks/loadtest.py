"""``make loadtest``: many simulated edges train against one real cloud process.

1. Starts ``splitkd-cloud serve`` as its own process (an untrained digits
   teacher checkpoint, ``--epochs 1000`` so that no session runs out of steps).
2. Starts ``--edges`` simulated edges (default 64), spread over
   ``--processes`` worker processes, each running its edges as async gRPC
   clients (``grpc.aio``, one channel per edge). Every edge does what a real
   edge does: registers, builds the frozen teacher head and the trainable
   student head from its session, and for each batch of its own digits runs
   both heads, sends only the activations at the cut (raw inputs stay in the
   worker), applies the returned gradient to its head. The edges register
   once (then each worker freezes its start-up objects for the garbage
   collector: a full collection would stop all its edges at once, which no
   fleet of separate devices does), then run two phases on the same sessions:
   - **closed loop** (``--duration``, 60 s): each edge sends its next step as
     soon as the answer arrives. With 64 edges the latency is then 64 / the
     cloud's throughput by construction: this measures saturation.
   - **paced** (``--paced-duration``, 90 s): between steps each edge waits what
     a real device of its profile would spend on its side of a step (its heads'
     FLOPs at the device's rate, the step's bytes over its link, with jitter:
     benchmarks/pacing.py), the demo's mix of device and link profiles by
     default (``--mix``). This measures whether the replica holds the fleet.
   - **capacity** (``--capacity``, 4 to 48 edges, 20 s each): the same pace
     with only the first N edges stepping (the others idle, their sessions
     kept): the most edges, and the steps/s, the replica holds at p99 <= 50 ms.
3. Samples the cloud's RSS every second (psutil when installed, otherwise
   ``/proc/PID/status``) and, per phase, the CPU the replica, the client
   processes and everything else used (``--pin split`` puts the replica and the
   clients on different CPUs).

Prints, per phase, steps, failed steps, steps/s, p50/p95/p99 step latency (the
round trip one edge waits for, measured on the edge, pauses excluded), the p50
and p99 inside the replica's Step handler (its own histogram: without the wire
and the client processes' event loops), CPU, and the cloud's RSS; writes
``runs/loadtest/{batching,no-batching}/report.json`` (a folder it made, or a new
one: it refuses to clean a folder holding files it did not write). Next to the
figure it prints what the figure asks: the least steps/s 64 paced edges send
when every step takes 50 ms, and the cores that takes at this run's CPU per step.
By default it runs twice, with the teacher tails of concurrent sessions
micro-batched (cloud_service/batcher.py) and without (one pass per step, the
baseline), prints all four figures side by side and whether the issue's figure
(>= 64 paced edges at p99 <= 50 ms, micro-batched) is met, next to the
closed-loop baseline. Exits 1 when any step failed or any edge could not
register (not when the figure is missed: it is a measurement).

``SimulatedEdge`` is also make scale-check's edge (benchmarks/scale_check.py):
with ``route`` it sends what a real solo edge sends (its routing key, balanced
placement, the replica its answers name: edge_agent/sticky.py), retries what a
replica cannot take now, resumes after a take-over, and checks its step count
against the cloud's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import itertools
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.loadtest_report import (
    cpu_usage,
    describe_phase,
    histogram_summary,
    print_comparison,
    print_figure,
    print_report,
    summarise_phase,
)
from benchmarks.loadtest_report import percentile_ms as percentile_ms  # make scale-check's
from benchmarks.pacing import DEMO_MIX, Pace, make_pace, parse_mix, step_flops
from edge_agent.plan_model import FRAME
from edge_agent.sticky import StickyUpstream
from splitkd import outdir
from splitkd.errors import InvalidArgument, SplitKDError
from splitkd.grpc_options import ROUTE_HEADER
from splitkd.names import TEACHER_CACHE_MISS as CACHE_MISS

SHARDS = 8  # distinct slices of the digits the edges train on (edge i gets shard i % 8)
# Worth sending again (what a real edge retries): no replica could take the call now.
_RETRIED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


# ---------------------------------------------------------------------------
# Simulated edges (worker processes)
# ---------------------------------------------------------------------------


@dataclass
class EdgeResult:
    name: str
    registered: bool = False
    steps: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    # When each of those steps was answered (time.time()), to split figures at a fault.
    answered_at: list[float] = field(default_factory=list)
    last_loss: float = math.nan
    retries: int = 0  # calls answered UNAVAILABLE (or timed out) and sent again
    resumes: int = 0  # FAILED_PRECONDITION, then Resume: both sides back to a common step
    redone: int = 0  # steps rolled back by those resumes and trained again
    cache_misses: int = 0  # a restored session's cloud lacked the teacher outputs: sent again
    # At the end, the cloud's next step minus this edge's: > 0 a step applied twice, < 0 lost.
    cloud_minus_edge: int | None = None
    # Paced phase: the device/link profile, the pauses drawn and their seconds, and how
    # many this host could not keep (its own head compute took longer than the device's).
    profile: str = ""
    pauses: int = 0
    pause_seconds: float = 0.0
    late_pauses: int = 0
    pace_seconds: float = 0.0  # the mean pause its profiles ask for


class SimulatedEdge:
    """One edge: its own channel, session, heads, optimizer and private data."""

    def __init__(
        self,
        address: str,
        name: str,
        shard: int,
        timeout: float,
        route: bool = False,
        teacher_cache: bool = True,
    ) -> None:
        import grpc

        from splitkd.data import edge_split, load_dataset
        from splitkd.data.partition import DEMO_PRESUMED_FRACTION, Shard
        from splitkd.grpc_options import channel_options
        from splitkd.v1 import splitkd_pb2_grpc as pb_grpc

        self.data = edge_split(
            load_dataset("digits"), Shard(shard, SHARDS), presumed_fraction=DEMO_PRESUMED_FRACTION
        ).train
        self.channel = grpc.aio.insecure_channel(address, options=channel_options())
        self.stub = pb_grpc.SplitTrainingStub(self.channel)
        self.timeout = timeout
        self.result = EdgeResult(name)
        self.rng = np.random.default_rng(shard)
        # Replicas behind Envoy: what a real solo edge sends, its device id as the
        # routing key and balanced placement, then the replica its answers name.
        self.sticky = StickyUpstream() if route else None
        self.snapshots: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        # The cloud's teacher-output cache, as a real edge uses it by default: which
        # samples' teacher activations the cloud holds (None: not asked or not granted).
        self.teacher_cache = teacher_cache
        self.cached: np.ndarray | None = None

    async def register(self) -> None:
        import grpc
        import torch

        from edge_agent.trainer import build_head
        from splitkd import codec
        from splitkd.flops import forward_flops
        from splitkd.hyper import Hyperparameters
        from splitkd.models import zoo
        from splitkd.models.spec import ModelSpec
        from splitkd.training import make_optimizer
        from splitkd.v1 import splitkd_pb2 as pb

        signature = self.data.signature
        try:
            reply = await self._unary(
                self.stub.Register,
                pb.RegisterRequest(
                    device_id=self.result.name,
                    profile=pb.DeviceProfile(name="loadtest", link="loopback", cpu_cores=1),
                    signature=pb.DatasetSignature(
                        input_shape=list(signature.input_shape),
                        num_classes=signature.num_classes,
                        name=signature.name,
                    ),
                    # As a real edge does (edge_agent/trainer.py): the cloud keeps the
                    # teacher's outputs per sample, so they go up once, not every epoch.
                    train_samples=len(self.data) if self.teacher_cache else 0,
                ),
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            self.result.failures.append(f"Register: {exc.code().name}: {exc.details()}")
            return
        self.session_id = reply.session_id
        self.wire_dtype = pb.DTYPE_FLOAT32  # the loadtest asks for no codec: float32
        self.batch_size = reply.hyperparameters.batch_size
        fits = self.teacher_cache and 0 < len(self.data) <= reply.teacher_cache_samples
        self.cached = np.zeros(len(self.data), dtype=bool) if fits else None
        self.step = reply.next_step
        student_spec = ModelSpec.from_json(reply.student.family, reply.student.spec_json)
        teacher_spec = ModelSpec.from_json(reply.teacher.family, reply.teacher.spec_json)
        student, teacher = zoo.build(student_spec), zoo.build(teacher_spec)
        self.student_head = build_head(
            student, reply.student_cut, codec.decode_weights(reply.student_head)
        )
        self.teacher_head = build_head(
            teacher, reply.teacher_cut, codec.decode_weights(reply.teacher_head)
        )
        self.teacher_head.requires_grad_(False)
        self.teacher_head.eval()
        h = reply.hyperparameters
        self.optimizer = make_optimizer(
            self.student_head.parameters(),
            Hyperparameters(
                optimizer=h.optimizer, learning_rate=h.learning_rate, batch_size=h.batch_size
            ),
        )
        self.x = torch.from_numpy(self.data.x)
        # The device's share of a step (the paced phase's compute): both heads' FLOPs.
        self.head_flops = (
            forward_flops(student_spec, 0, reply.student_cut),
            forward_flops(teacher_spec, 0, reply.teacher_cut),
        )
        self.checkpoint_every = h.checkpoint_every or 25
        self._snapshot()
        self.result.registered = True

    def _snapshot(self) -> None:
        """The head and its optimizer at this step, as the real edge keeps them (to resume)."""
        self.snapshots[self.step] = (
            copy.deepcopy(self.student_head.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
        )
        for step in sorted(self.snapshots)[:-4]:
            if step != 0:
                del self.snapshots[step]

    async def _resume(self) -> None:
        """Agree with the cloud on a step both can restore; roll the head back to it."""
        from splitkd.v1 import splitkd_pb2 as pb

        request = pb.ResumeRequest(
            session_id=self.session_id, available_steps=sorted(self.snapshots)
        )
        reply = await self._call(self.stub.Resume, request)
        model, optimizer = self.snapshots[reply.step]
        self.student_head.load_state_dict(model)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer))
        for step in [s for s in self.snapshots if s > reply.step]:
            del self.snapshots[step]
        self.result.resumes += 1
        self.result.redone += self.step - reply.step
        self.step = reply.step

    async def _unary(self, method: Any, request: Any, **options: Any) -> Any:
        """One call, with the headers a real edge sends; its answer may name a replica."""
        metadata = None
        if self.sticky is not None:
            metadata = ((ROUTE_HEADER, self.result.name), *self.sticky.metadata())
        call = method(request, timeout=self.timeout, metadata=metadata, **options)
        reply = await call
        if self.sticky is not None:
            self.sticky.observe(await call.initial_metadata())
        return reply

    async def _call(self, method: Any, request: Any) -> Any:
        """A call retried while the cloud is unavailable (a replica dying, a session moving)."""
        import grpc

        for attempt in itertools.count():
            try:
                return await self._unary(method, request, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRIED or attempt >= 60:
                    raise
                self.result.retries += 1
                await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))
        raise AssertionError("unreachable")

    async def verify(self) -> None:
        """Compare step counts with the cloud: a lost or doubly applied step shows here."""
        import grpc

        from splitkd.v1 import splitkd_pb2 as pb

        if not self.result.registered:
            return
        try:
            reply = await self._call(
                self.stub.Heartbeat, pb.HeartbeatRequest(session_id=self.session_id)
            )
        except grpc.aio.AioRpcError as exc:
            self.result.failures.append(f"Heartbeat: {exc.code().name}: {exc.details()}")
            return
        self.result.cloud_minus_edge = reply.next_step - self.step

    def _batches(self) -> Any:
        while True:
            order = self.rng.permutation(len(self.data))
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield order[start : start + self.batch_size]

    async def train(self, deadline: float, profiles: tuple[str, str] | None = None) -> None:
        """Steps until ``deadline``: back to back (closed loop), or with ``profiles`` (a
        device and a link profile) paced as that device would send them (open loop)."""
        import torch

        from splitkd import codec

        if not self.result.registered:
            return
        self.student_head.train()
        batches = self._batches()
        pace: Pace | None = None
        rng = random.Random(f"{self.result.name}/{profiles}")
        send_at = 0.0
        while time.monotonic() < deadline:
            index = next(batches)
            inputs = self.x[torch.from_numpy(index)]
            student_act = self.student_head(inputs)
            held = self.cached is not None and bool(self.cached[index].all())
            teacher_act = None
            if not held:
                with torch.inference_mode():  # frozen: no autograd bookkeeping at all
                    teacher_act = self.teacher_head(inputs)
            request = self._step_request(student_act, teacher_act, index)
            if profiles is not None:
                if pace is None:
                    pace = self._pace(profiles, request)
                    # A random first offset: the edges do not start in step with each other.
                    send_at = time.monotonic() + rng.uniform(0, pace.mean_seconds)
                if not await self._wait_until(send_at, deadline):
                    break
            reply = await self._send(request, deadline)
            answered = time.monotonic()
            if reply is None:
                if time.monotonic() < deadline:
                    continue  # resumed: this step number's batch again
                break
            if self.cached is not None:
                self.cached[index] = True
            gradient = codec.decode(reply.gradient, shape=tuple(student_act.shape), finite=True)
            self.optimizer.zero_grad()
            student_act.backward(torch.from_numpy(gradient.astype(np.float32)))
            self.optimizer.step()
            self.result.last_loss = reply.loss
            self.result.steps += 1
            self.step += 1
            if self.step % self.checkpoint_every == 0:
                self._snapshot()
            if pace is not None:
                # The device's side of the next step starts at the answer: this host's
                # own head compute (backward, next forwards) counts towards the pause.
                send_at = answered + pace.sample(rng)

    def _step_request(self, student_act: Any, teacher_act: Any, index: np.ndarray) -> Any:
        """The step as a real edge sends it: the teacher's side and the labels only for a
        batch the cloud does not hold yet (``teacher_act`` None: it holds them)."""
        from splitkd import codec
        from splitkd.v1 import splitkd_pb2 as pb

        request = pb.StepRequest(
            session_id=self.session_id,
            step=self.step,
            student_activations=codec.encode(student_act.detach().numpy(), self.wire_dtype),
        )
        if teacher_act is not None:
            request.teacher_activations.CopyFrom(codec.encode(teacher_act.numpy(), self.wire_dtype))
            request.labels.CopyFrom(codec.encode(self.data.y[index].astype(np.int64)))
        if self.cached is not None:
            request.sample_ids.CopyFrom(codec.encode(index.astype(np.int32)))
        return request

    def _pace(self, profiles: tuple[str, str], request: Any) -> Pace:
        """This edge's pause from its profiles, the heads' FLOPs and the step's bytes on the
        wire as the client counts them (protobuf size + gRPC's 5-byte frame); the answer
        carries a gradient the size of the student's activations (plan_model.Wire's rule)."""
        from splitkd.v1 import splitkd_pb2 as pb

        reply = pb.StepResponse(
            step=request.step,
            gradient=request.student_activations,
            loss=1.5,
            kd_loss=1.5,
            ce_loss=1.5,
            correct=self.batch_size // 2,
        )
        flops = step_flops(*self.head_flops, self.batch_size)
        pace = make_pace(profiles, flops, request.ByteSize() + FRAME, reply.ByteSize() + FRAME)
        self.result.profile = pace.label
        self.result.pace_seconds = pace.mean_seconds
        return pace

    async def _wait_until(self, send_at: float, deadline: float) -> bool:
        """Sleep until ``send_at`` (False: the phase ends first); count pauses this host
        could not keep because its own compute already took longer."""
        now = time.monotonic()
        self.result.pauses += 1
        if send_at <= now:
            self.result.late_pauses += 1
            return True
        if send_at >= deadline:
            return False
        self.result.pause_seconds += send_at - now
        await asyncio.sleep(send_at - now)
        return True

    async def _send(self, request: Any, deadline: float) -> Any:
        """One step's call, retried as a real edge retries; None after a resume or at the
        deadline. Latency: the round trip the edge waits for, pauses excluded."""
        import grpc

        attempt = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                reply = await self._unary(self.stub.Step, request)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRIED:
                    # A replica died or the session is moving: resending is safe
                    # (steps are idempotent by number), as a real edge does.
                    self.result.retries += 1
                    await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))
                    attempt += 1
                    continue
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    if CACHE_MISS in (exc.details() or "") and self.cached is not None:
                        self.cached[:] = False  # a restored session: send teacher outputs again
                        self.result.cache_misses += 1
                        return None
                    await self._resume()  # another replica restored a checkpoint
                    return None
                # Anything else is a failure: counted, and it fails the run.
                self.result.failures.append(f"step {self.step}: {exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.5)
                continue
            self.result.latencies.append(time.perf_counter() - started)
            self.result.answered_at.append(time.time())
            return reply
        return None

    async def close(self) -> None:
        await self.channel.close(None)


async def _run_worker(
    address: str,
    names: list[tuple[str, int]],
    duration: float,
    timeout: float,
    ready: Any,
    start: Event,
    route: bool = False,
) -> list[EdgeResult]:
    edges = [SimulatedEdge(address, name, shard, timeout, route) for name, shard in names]
    await asyncio.gather(*(edge.register() for edge in edges))
    ready.put(len(edges))
    await asyncio.get_running_loop().run_in_executor(None, start.wait)
    deadline = time.monotonic() + duration
    await asyncio.gather(*(edge.train(deadline) for edge in edges))
    await asyncio.gather(*(edge.verify() for edge in edges))
    await asyncio.gather(*(edge.close() for edge in edges))
    return [edge.result for edge in edges]


def worker_main(
    address: str,
    names: list[tuple[str, int]],
    duration: float,
    timeout: float,
    ready: Any,
    start: Event,
    results: Any,
    route: bool = False,
) -> None:
    import torch

    # Each edge's heads are tiny: one thread, as on a device core.
    torch.set_num_threads(1)
    try:
        out = asyncio.run(_run_worker(address, names, duration, timeout, ready, start, route))
        results.put([asdict(r) for r in out])
    except BaseException as exc:  # the parent must hear about it, not wait forever
        ready.put(0)
        results.put([asdict(EdgeResult(f"worker {names[0][0]}…", failures=[repr(exc)]))])
        raise


# The loadtest's phases, one after the other on the same sessions.
CLOSED, PACED = "closed", "paced"


@dataclass(frozen=True)
class EdgeSpec:
    """One simulated edge of ``make loadtest``: its place in the fleet, data and profiles."""

    index: int
    name: str
    shard: int
    profiles: tuple[str, str]  # (device, link) of the paced phases


@dataclass(frozen=True)
class Phase:
    name: str  # CLOSED: back to back (saturation); PACED: as real devices send (open loop)
    duration: float
    # The first this many edges step (a capacity sweep's point); None: every edge.
    edges: int | None = None

    @property
    def key(self) -> str:
        """The phase's name in the report: ``paced``, or ``paced-16`` for 16 of the edges."""
        return self.name if self.edges is None else f"{self.name}-{self.edges}"

    def active(self, index: int) -> bool:
        return self.edges is None or index < self.edges


async def _run_phases(
    address: str,
    edges_spec: list[EdgeSpec],
    phases: list[Phase],
    timeout: float,
    ready: Any,
    starts: list[Event],
    results: Any,
    worker: int,
) -> None:
    edges = [SimulatedEdge(address, e.name, e.shard, timeout) for e in edges_spec]
    await asyncio.gather(*(edge.register() for edge in edges))
    # torch and these edges' models live as long as the worker: frozen, the collector's
    # oldest generation never walks them again (each walk stopped all of this process's
    # edges for 0.3-1 s, a pause one device's own small process would not have).
    gc.freeze()
    ready.put(sum(edge.result.registered for edge in edges))
    loop = asyncio.get_running_loop()
    for number, phase in enumerate(phases):
        await loop.run_in_executor(None, starts[number].wait)
        for edge in edges:  # each phase's figures on their own; the sessions carry on
            old = edge.result
            edge.result = EdgeResult(old.name, old.registered, failures=old.failures[:0])
        deadline = time.monotonic() + phase.duration
        active = [
            (edge, spec)
            for edge, spec in zip(edges, edges_spec, strict=True)
            if phase.active(spec.index)
        ]
        await asyncio.gather(
            *(
                edge.train(deadline, spec.profiles if phase.name == PACED else None)
                for edge, spec in active
            )
        )
        results.put((worker, number, [asdict(edge.result) for edge, _ in active]))
    await asyncio.gather(*(edge.close() for edge in edges))


def phased_worker_main(
    address: str,
    edges_spec: list[EdgeSpec],
    phases: list[Phase],
    timeout: float,
    ready: Any,
    starts: list[Event],
    results: Any,
    worker: int,
    cpus: set[int] | None = None,
) -> None:
    """One client process of ``make loadtest``: its edges through every phase."""
    if cpus:
        os.sched_setaffinity(0, cpus)  # before torch starts threads: they inherit it
    import torch

    # Each edge's heads are tiny: one thread, as on a device core.
    torch.set_num_threads(1)
    try:
        asyncio.run(
            _run_phases(address, edges_spec, phases, timeout, ready, starts, results, worker)
        )
    except BaseException as exc:  # the parent must hear about it, not wait forever
        ready.put(0)
        failed = EdgeResult(f"worker {worker}", failures=[repr(exc)])
        results.put((worker, -1, [asdict(failed)]))
        raise


# ---------------------------------------------------------------------------
# The cloud process and its memory
# ---------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while True:
            try:
                self.samples.append((round(time.monotonic() - self._t0, 1), rss_bytes(self.pid)))
            except OSError:
                return
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()


def make_teacher(path: Path) -> None:
    """An untrained but fixed digits teacher: the load is the same as a trained one's."""
    from cloud_service.teacher import Teacher
    from splitkd.models import zoo
    from splitkd.signature import DatasetSignature

    signature = DatasetSignature((1, 8, 8), 10, "digits")
    spec = zoo.default_teacher(signature)
    model = zoo.build(spec, 7)
    model.eval()
    Teacher(spec, model, None, signature.name).save(path)


def start_cloud(
    out: Path, extra_args: tuple[str, ...] = (), cpus: set[int] | None = None
) -> tuple[subprocess.Popen[bytes], str, str]:
    from splitkd.demo import free_port, wait_healthy

    state = out / "cloud-state"
    # A fresh state: the cloud would otherwise restore the last run's checkpointed sessions.
    outdir.clear(state, owner=out)
    make_teacher(state / "teacher.safetensors")
    grpc_port, http_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "cloud_service.cli", "-q", "serve",
        "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--teacher", str(state / "teacher.safetensors"), "--state-dir", str(state),
        "--epochs", "1000", *extra_args,
    ]  # fmt: skip
    log_path = out / "cloud.log"
    with log_path.open("wb") as log:
        cloud = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Pinned before exec: every thread the cloud starts inherits the CPU set.
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    http = f"http://127.0.0.1:{http_port}"
    wait_healthy(f"{http}/healthz", cloud, log_path, timeout=120)
    return cloud, f"127.0.0.1:{grpc_port}", http


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(args: argparse.Namespace, batching: bool = True) -> dict[str, Any]:
    """One cloud, ``args.edges`` edges registered once, then each phase in turn."""
    out = outdir.claim(Path(args.out) / ("batching" if batching else "no-batching"), "loadtest")
    load_start = round(os.getloadavg()[0], 2)
    pinning = pin_cpus(args.pin)
    extra = () if batching else ("--no-teacher-batching",)
    cloud, address, http = start_cloud(out, extra, pinning["replica"])
    sampler = MemorySampler(cloud.pid)
    sampler.start()
    rss_start = rss_bytes(cloud.pid)
    processes = max(1, min(args.processes, args.edges))
    spec = [
        EdgeSpec(i, f"load-edge-{i:03d}", i % SHARDS, args.mix[i % len(args.mix)])
        for i in range(args.edges)
    ]
    groups = [spec[p::processes] for p in range(processes)]
    phases = args.phases
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    starts = [context.Event() for _ in phases]
    workers = [
        context.Process(
            target=phased_worker_main,
            args=(address, group, phases, args.timeout, ready, starts, results, p),
            kwargs={"cpus": pinning["generator"]},
            name=f"edges-{p}",
        )
        for p, group in enumerate(groups)
    ]
    reports: dict[str, Any] = {}
    try:
        for w in workers:
            w.start()
        registered = sum(ready.get(timeout=300) for _ in workers)
        rss_registered = rss_bytes(cloud.pid)
        dead: set[int] = set()
        for number, phase in enumerate(phases):
            stepping = registered if phase.edges is None else min(phase.edges, registered)
            print(
                f"loadtest: {stepping} of {registered} edges in {len(workers)} processes, "
                f"{describe_phase(phase.name)}, {phase.duration:.0f} s …",
                flush=True,
            )
            before = cpu_snapshot(cloud.pid, workers)
            handler_before = step_handler_buckets(http)
            starts[number].set()
            wait = phase.duration + 4 * args.timeout + 120
            edges = collect(results, number, len(workers), dead, wait)
            usage = cpu_usage(before, cpu_snapshot(cloud.pid, workers))
            reports[phase.key] = summarise_phase(phase, edges, usage, args.mix)
            reports[phase.key]["handler_latency_ms"] = histogram_summary(
                handler_before, step_handler_buckets(http)
            )
        for w in workers:
            w.join(60)
        cloud_alive = cloud.poll() is None
        sessions = _sessions(http)
    finally:
        sampler.stop()
        for w in workers:
            if w.is_alive():
                w.terminate()
        cloud.terminate()
        try:
            cloud.wait(30)
        except subprocess.TimeoutExpired:
            cloud.kill()
    rss = [b for _, b in sampler.samples]
    report = {
        "teacher_batching": batching,
        "edges": args.edges,
        "edges_registered": registered,
        "worker_processes": len(workers),
        "pinning": {k: sorted(v) if v else None for k, v in pinning.items()},
        "phases": reports,
        "cloud_rss_bytes": {
            "start": rss_start,
            "after_register": rss_registered,
            "peak": max(rss, default=rss_start),
            "end": rss[-1] if rss else rss_start,
        },
        "cloud_rss_samples": sampler.samples,
        "cloud_alive_at_end": cloud_alive,
        "cloud_sessions_at_end": sessions,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            # Other work on the box skews every figure: say how busy it was.
            "load_average_1min_at_start": load_start,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def pin_cpus(mode: str) -> dict[str, set[int] | None]:
    """``split``: the replica on the first CPU it may use, the generator on the rest."""
    if mode == "none":
        return {"replica": None, "generator": None}
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("--pin split needs at least 2 CPUs")
    return {"replica": {allowed[0]}, "generator": set(allowed[1:])}


def collect(
    results: Any, number: int, workers: int, dead: set[int], timeout: float
) -> list[dict[str, Any]]:
    """Every worker's edges for phase ``number``; a worker that died reports once."""
    got: dict[int, list[dict[str, Any]]] = {}
    edges: list[dict[str, Any]] = []
    while len(got) + len(dead) < workers:
        worker, phase, results_of = results.get(timeout=timeout)
        if phase == -1:
            dead.add(worker)
            edges.extend(results_of)
        elif phase == number:
            got[worker] = results_of
    return edges + [e for w in sorted(got) for e in got[w]]


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (Linux /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(cloud_pid: int, workers: list[Any]) -> dict[str, float]:
    generator = 0.0
    for worker in workers:
        with contextlib.suppress(OSError):  # a worker that died: its CPU is gone with it
            generator += cpu_seconds(worker.pid)
    return {
        "replica": cpu_seconds(cloud_pid),
        "generator": generator,
        "machine": machine_busy_seconds(),
        "at": time.monotonic(),
    }


def step_handler_buckets(http: str) -> dict[float, float]:
    """The replica's own Step latency histogram (cumulative count per bucket bound): the
    time in its handler, without the client processes' event loops or the wire."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urlopen(f"{http}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "splitkd_cloud_rpc_duration_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            wanted = labels.get("method") == "Step" and labels.get("code") == "OK"
            if wanted and sample.name.endswith("_bucket"):
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def _sessions(http: str) -> int | None:
    from splitkd.demo import http_json

    try:
        return int(http_json(f"{http}/healthz")["sessions"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.batching]
    reports = []
    for batching in modes:
        try:
            report = run(args, batching)
        except SplitKDError as exc:
            print(f"loadtest: {exc}", file=sys.stderr)
            return 2
        print_report(report, Path(args.out) / ("batching" if batching else "no-batching"))
        reports.append(report)
    print_comparison(reports)
    print_figure(reports, args.edges)
    ok = all(
        all(p["failed_steps"] == 0 for p in r["phases"].values())
        and r["edges_registered"] == args.edges
        and r["cloud_alive_at_end"]
        for r in reports
    )
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--edges", type=int, default=64, help="simulated edges (default 64)")
    add(
        "--batching",
        choices=("both", "on", "off"),
        default="both",
        help="teacher micro-batching: run with it, without it, or both and compare (default)",
    )
    add(
        "--phase",
        choices=("both", CLOSED, PACED),
        default="both",
        help="closed loop (saturation), paced (devices' own pace), or both (default)",
    )
    add("--duration", type=float, default=60.0, help="seconds of the closed loop (default 60)")
    add(
        "--paced-duration", type=float, default=90.0, help="seconds of the paced phase (default 90)"
    )
    add(
        "--mix",
        default="demo",
        help="device/link profiles of the paced edges, edge i gets entry i mod n: 'demo' "
        "(splitkd.demo.DEMO_PROFILES) or e.g. raspberry-pi-4/wifi,jetson-nano/lte",
    )
    add(
        "--pin",
        choices=("none", "split"),
        default="none",
        help="split: the replica on one CPU, the client processes on the others "
        "(default none: all share the machine's CPUs)",
    )
    add(
        "--processes",
        type=int,
        default=2,
        help="client worker processes the edges are spread over (default 2: one per core here)",
    )
    add(
        "--capacity",
        default="4,8,12,16,24,32,48",
        help="after the paced phase, the same pace with only the first N edges stepping, for "
        "each N of this list: the most edges the replica holds at p99 <= 50 ms "
        "(default 4,8,12,16,24,32,48; 'none' to skip)",
    )
    add(
        "--capacity-duration",
        type=float,
        default=20.0,
        help="seconds of each capacity point (default 20)",
    )
    add("--timeout", type=float, default=30.0, help="deadline of one Step call, seconds")
    add("--out", default="runs/loadtest", help="report folder (a subfolder per batching mode)")
    args = parser.parse_args(argv)
    if args.edges < 1 or min(args.duration, args.paced_duration, args.capacity_duration) <= 0:
        parser.error("--edges must be >= 1, --duration, --paced-duration, --capacity-duration > 0")
    try:
        args.mix = DEMO_MIX if args.mix == "demo" else parse_mix(args.mix)
    except InvalidArgument as exc:
        parser.error(f"--mix: {exc}")
    chosen = (CLOSED, PACED) if args.phase == "both" else (args.phase,)
    durations = {CLOSED: args.duration, PACED: args.paced_duration}
    args.phases = [Phase(name, durations[name]) for name in chosen]
    if PACED in chosen:
        args.phases += [
            Phase(PACED, args.capacity_duration, n)
            for n in _capacity_points(parser, args.capacity)
            if n < args.edges
        ]
    return args


def _capacity_points(parser: argparse.ArgumentParser, text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        points = sorted({int(item) for item in text.split(",")})
    except ValueError:
        parser.error(f"--capacity: a comma-separated list of edge counts or 'none', got {text!r}")
    if points[0] < 1:
        parser.error("--capacity: every edge count must be >= 1")
    return points


if __name__ == "__main__":
    sys.exit(main())
