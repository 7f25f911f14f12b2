"""``make loadtest``: many simulated edges train against one real cloud process.

1. Starts ``splitkd-cloud serve`` as its own process (an untrained digits
   teacher checkpoint, ``--epochs 1000`` so that no session runs out of steps).
2. Starts ``--edges`` simulated edges (default 64), spread over
   ``--processes`` worker processes, each running its edges as async gRPC
   clients (``grpc.aio``, one channel per edge). Every edge does what a real
   edge does: registers, builds the frozen teacher head and the trainable
   student head from its session, and for each batch of its own digits runs
   both heads, sends only the activations at the cut (raw inputs stay in the
   worker), applies the returned gradient to its head. Steps run back to back
   for ``--duration`` seconds (default 180).
3. Samples the cloud's RSS every second (psutil when installed, otherwise
   ``/proc/PID/status``).

Prints edges, steps, failed steps, steps/s, p50/p95/p99 step latency (the
round trip one edge waits for, measured on the edge) and the cloud's RSS at
start and at peak; writes ``runs/loadtest/{batching,no-batching}/report.json``.
By default it runs twice, with the teacher tails of concurrent sessions
micro-batched (cloud_service/batcher.py) and without (one pass per step, the
baseline), and prints both side by side. Exits 1 when any step failed or any
edge could not register.

``SimulatedEdge`` is also make scale-check's edge (benchmarks/scale_check.py):
with ``route`` it sends what a real solo edge sends (its routing key, balanced
placement, the replica its answers name: edge_agent/sticky.py), retries what a
replica cannot take now, resumes after a take-over, and checks its step count
against the cloud's.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
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

from edge_agent.sticky import StickyUpstream
from splitkd.grpc_options import ROUTE_HEADER

MIB = 1024 * 1024
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
    # At the end, the cloud's next step minus this edge's: > 0 a step applied twice, < 0 lost.
    cloud_minus_edge: int | None = None


class SimulatedEdge:
    """One edge: its own channel, session, heads, optimizer and private data."""

    def __init__(
        self, address: str, name: str, shard: int, timeout: float, route: bool = False
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

    async def register(self) -> None:
        import grpc
        import torch

        from edge_agent.trainer import build_head
        from splitkd import codec
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
                ),
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            self.result.failures.append(f"Register: {exc.code().name}: {exc.details()}")
            return
        self.session_id = reply.session_id
        self.wire_dtype = pb.DTYPE_FLOAT32  # the loadtest asks for no codec: float32
        self.batch_size = reply.hyperparameters.batch_size
        self.step = reply.next_step
        student = zoo.build(ModelSpec.from_json(reply.student.family, reply.student.spec_json))
        teacher = zoo.build(ModelSpec.from_json(reply.teacher.family, reply.teacher.spec_json))
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

    async def train(self, deadline: float) -> None:
        import grpc
        import torch

        from splitkd import codec
        from splitkd.v1 import splitkd_pb2 as pb

        if not self.result.registered:
            return
        self.student_head.train()
        batches = self._batches()
        while time.monotonic() < deadline:
            index = next(batches)
            inputs = self.x[torch.from_numpy(index)]
            student_act = self.student_head(inputs)
            with torch.no_grad():
                teacher_act = self.teacher_head(inputs)
            request = pb.StepRequest(
                session_id=self.session_id,
                step=self.step,
                student_activations=codec.encode(student_act.detach().numpy(), self.wire_dtype),
                teacher_activations=codec.encode(teacher_act.numpy(), self.wire_dtype),
                labels=codec.encode(self.data.y[index].astype(np.int64)),
            )
            reply = None
            attempt = 0
            while reply is None and time.monotonic() < deadline:
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
                        await self._resume()  # another replica restored a checkpoint
                        break
                    # Anything else is a failure: counted, and it fails the run.
                    self.result.failures.append(
                        f"step {self.step}: {exc.code().name}: {exc.details()}"
                    )
                    await asyncio.sleep(0.5)
                    continue
                self.result.latencies.append(time.perf_counter() - started)
                self.result.answered_at.append(time.time())
            if reply is None:
                if time.monotonic() < deadline:
                    continue  # resumed: this step number's batch again
                break
            gradient = codec.decode(reply.gradient, shape=tuple(student_act.shape), finite=True)
            self.optimizer.zero_grad()
            student_act.backward(torch.from_numpy(gradient.astype(np.float32)))
            self.optimizer.step()
            self.result.last_loss = reply.loss
            self.result.steps += 1
            self.step += 1
            if self.step % self.checkpoint_every == 0:
                self._snapshot()

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
    out: Path, extra_args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str, str]:
    from splitkd.demo import free_port, wait_healthy

    state = out / "cloud-state"
    # A fresh state: the cloud would otherwise restore the last run's checkpointed sessions.
    shutil.rmtree(state, ignore_errors=True)
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
        cloud = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    http = f"http://127.0.0.1:{http_port}"
    wait_healthy(f"{http}/healthz", cloud, log_path, timeout=120)
    return cloud, f"127.0.0.1:{grpc_port}", http


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def percentile_ms(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2) if len(values) else math.nan


def run(args: argparse.Namespace, batching: bool = True) -> dict[str, Any]:
    out = Path(args.out) / ("batching" if batching else "no-batching")
    out.mkdir(parents=True, exist_ok=True)
    load_start = round(os.getloadavg()[0], 2)
    cloud, address, http = start_cloud(out, () if batching else ("--no-teacher-batching",))
    sampler = MemorySampler(cloud.pid)
    sampler.start()
    rss_start = rss_bytes(cloud.pid)
    processes = max(1, min(args.processes, args.edges))
    names = [(f"load-edge-{i:03d}", i % SHARDS) for i in range(args.edges)]
    groups = [names[p::processes] for p in range(processes)]
    context = multiprocessing.get_context("spawn")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    workers = [
        context.Process(
            target=worker_main,
            args=(address, group, args.duration, args.timeout, ready, start, results),
            name=f"edges-{p}",
        )
        for p, group in enumerate(groups)
    ]
    try:
        for w in workers:
            w.start()
        registered = sum(ready.get(timeout=300) for _ in workers)
        rss_registered = rss_bytes(cloud.pid)
        cpu_before = cpu_seconds(cloud.pid)
        print(
            f"loadtest: {registered} edges registered in {len(workers)} processes; "
            f"stepping for {args.duration:.0f} s …",
            flush=True,
        )
        started = time.monotonic()
        start.set()
        edges: list[dict[str, Any]] = []
        for _ in workers:
            edges.extend(results.get(timeout=args.duration + 4 * args.timeout + 120))
        wall = time.monotonic() - started
        cpu_used = cpu_seconds(cloud.pid) - cpu_before
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
    latencies = np.array([s for e in edges for s in e["latencies"]])
    steps = sum(e["steps"] for e in edges)
    failures = [f for e in edges for f in e["failures"]]
    # The window: from the start signal to the last edge's deadline (what the edges stepped in).
    window = min(wall, args.duration)
    rss = [b for _, b in sampler.samples]
    report = {
        "teacher_batching": batching,
        "edges": args.edges,
        "edges_registered": sum(1 for e in edges if e["registered"]),
        "worker_processes": len(workers),
        "duration_seconds": args.duration,
        "total_steps": steps,
        "failed_steps": len(failures),
        "failures": failures[:50],
        "steps_per_second": round(steps / window, 2),
        "step_latency_ms": {
            "p50": percentile_ms(latencies, 50),
            "p95": percentile_ms(latencies, 95),
            "p99": percentile_ms(latencies, 99),
            "max": round(float(latencies.max()) * 1000, 2) if len(latencies) else math.nan,
            "mean": round(float(latencies.mean()) * 1000, 2) if len(latencies) else math.nan,
        },
        "steps_per_edge": {
            "min": min((e["steps"] for e in edges), default=0),
            "max": max((e["steps"] for e in edges), default=0),
        },
        "cloud_rss_bytes": {
            "start": rss_start,
            "after_register": rss_registered,
            "peak": max(rss, default=rss_start),
            "end": rss[-1] if rss else rss_start,
        },
        "cloud_rss_samples": sampler.samples,
        "cloud_cpu_cores_used": round(cpu_used / wall, 2) if wall else None,
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


def _sessions(http: str) -> int | None:
    from splitkd.demo import http_json

    try:
        return int(http_json(f"{http}/healthz")["sessions"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def print_report(report: dict[str, Any], out: Path) -> None:
    latency = report["step_latency_ms"]
    rss = report["cloud_rss_bytes"]
    lines = [
        ("batching", "teacher tails micro-batched across sessions" if report["teacher_batching"]
         else "one teacher pass per step (--no-teacher-batching)"),
        ("edges", f"{report['edges']} ({report['edges_registered']} registered, "
         f"{report['worker_processes']} client processes, one async gRPC channel each)"),
        ("duration", f"{report['duration_seconds']:.0f} s"),
        ("total steps", f"{report['total_steps']} (per edge {report['steps_per_edge']['min']}"
         f"-{report['steps_per_edge']['max']})"),
        ("failed steps", str(report["failed_steps"])),
        ("steps/s", f"{report['steps_per_second']:.1f}"),
        ("step latency", f"p50 {latency['p50']:.1f} ms, p95 {latency['p95']:.1f} ms, "
         f"p99 {latency['p99']:.1f} ms (max {latency['max']:.1f} ms)"),
        ("cloud RSS", f"start {rss['start'] / MIB:.1f} MiB, after register "
         f"{rss['after_register'] / MIB:.1f} MiB, peak {rss['peak'] / MIB:.1f} MiB, "
         f"end {rss['end'] / MIB:.1f} MiB"),
        ("cloud CPU", f"{report['cloud_cpu_cores_used']} cores of {report['machine']['cpu_count']}"),
        ("machine load", f"1-min load average {report['machine']['load_average_1min_at_start']} "
         f"at start, {report['machine']['load_average_1min_at_end']} at end"),
        ("report", str(out / "report.json")),
    ]  # fmt: skip
    for label, value in lines:
        print(f"  {label + ':':<14} {value}")
    for failure in report["failures"][:10]:
        print(f"  failure: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, default=64, help="simulated edges (default 64)")
    parser.add_argument(
        "--batching",
        choices=("both", "on", "off"),
        default="both",
        help="teacher micro-batching: run with it, without it, or both and compare (default)",
    )
    parser.add_argument(
        "--duration", type=float, default=180.0, help="seconds of stepping (default 180)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="client worker processes the edges are spread over (default 2: one per core here)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of one Step call, seconds"
    )
    parser.add_argument(
        "--out", default="runs/loadtest", help="report folder (a subfolder per batching mode)"
    )
    args = parser.parse_args(argv)
    if args.edges < 1 or args.duration <= 0:
        parser.error("--edges must be >= 1 and --duration > 0")
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.batching]
    reports = []
    for batching in modes:
        report = run(args, batching)
        print_report(report, Path(args.out) / ("batching" if batching else "no-batching"))
        reports.append(report)
    if len(reports) == 2:
        print_comparison(reports)
    ok = all(
        r["failed_steps"] == 0 and r["edges_registered"] == args.edges and r["cloud_alive_at_end"]
        for r in reports
    )
    return 0 if ok else 1


def print_comparison(reports: list[dict[str, Any]]) -> None:
    print(f"\n  {'teacher passes':<34} {'steps/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for r in reports:
        label = "micro-batched" if r["teacher_batching"] else "one per step (the baseline)"
        latency = r["step_latency_ms"]
        print(
            f"  {label:<34} {r['steps_per_second']:>8.1f} {latency['p50']:>8.1f} "
            f"{latency['p99']:>8.1f} {r['failed_steps']:>7}"
        )


if __name__ == "__main__":
    sys.exit(main())
