"""``make scale-check``: cloud replicas behind a real Envoy, one SIGKILLed mid-run.

1. Trains (once, cached) a digits teacher, then runs the two *real* edges
   (``splitkd-edge train``, shards 0/2 and 1/2) against a single undisturbed
   cloud: the reference accuracies.
2. Starts ``--replicas`` (3) ``splitkd-cloud serve`` processes sharing a folder
   store with leases, and a real Envoy (deploy/envoy/envoy.yaml, pointed at
   them) on loopback.
3. Through Envoy: ``--edges`` (32) simulated edges (benchmarks/loadtest.py's,
   placed as solo devices are: round robin, then sticky; retrying, resuming)
   and the same two real edges.
4. Once the real edges are well into training, SIGKILLs the replica that holds
   real edge 0's session (no checkpoint, no lease released).
5. Prints sessions per replica before the kill (spread), failed steps, steps
   lost or applied twice (each edge's step count against the cloud's at the
   end), resumes and steps trained again, the real edges' accuracy against the
   reference, p50/p99 step latency before and after the kill, and how long the
   moved sessions waited. Writes runs/scale-check/report.json; exits 1 when a
   figure misses the issue's bar.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadtest import SHARDS, percentile_ms, worker_main
from splitkd.demo import http_json
from testbed.replicas import Envoy, Replica, start_envoy, start_replica, wait_replicas

REAL_EDGES = 2
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "SPLITKD_LOG_LEVEL": "WARNING"}


def teacher(out: Path) -> Path:
    from cloud_service.teacher import train_teacher
    from splitkd.hyper import Hyperparameters

    path = out / "teacher.safetensors"
    if not path.exists():
        print("scale-check: training the digits teacher (once) …", flush=True)
        train_teacher("digits", hyper=Hyperparameters(epochs=8, learning_rate=0.001)).save(path)
    return path


def real_edge(out: Path, address: str, index: int, epochs: int) -> subprocess.Popen[bytes]:
    folder = out / f"real-edge-{index}"
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "edge_agent.cli", "train", "--cloud", address,
        "--data", "digits", "--shard", f"{index}/{REAL_EDGES}", "--device-id", f"real-edge-{index}",
        "--epochs", str(epochs), "--report", str(folder / "report.json"),
        "--model-dir", str(folder / "models"), "--checkpoint-dir", str(folder / "checkpoints"),
        "--fresh", "--no-progress", "--no-plots", "--timeout", "30", "--retry-seconds", "300",
    ]  # fmt: skip
    log = (folder / "edge.log").open("wb")
    return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def finish_real_edges(out: Path, edges: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    reports = []
    for index, edge in enumerate(edges):
        code = edge.wait(1800)
        path = out / f"real-edge-{index}" / "report.json"
        if code != 0 or not path.exists():
            log = (out / f"real-edge-{index}" / "edge.log").read_text(errors="replace")
            reports.append({"failed": True, "exit_code": code, "log_tail": log[-2000:]})
        else:
            reports.append(json.loads(path.read_text()))
    return reports


def reference_run(out: Path, teacher_path: Path, epochs: int) -> list[dict[str, Any]]:
    """The real edges against one cloud that nothing disturbs."""
    folder = out / "reference"
    replica = start_replica(folder, "alone", teacher_path, str(folder / "store"), env=ENV)
    try:
        wait_replicas([replica])
        edges = [real_edge(folder, replica.host, i, epochs) for i in range(REAL_EDGES)]
        return finish_real_edges(folder, edges)
    finally:
        replica.stop()


def sessions_by_replica(replicas: list[Replica]) -> dict[str, list[str]]:
    out = {}
    for replica in replicas:
        try:
            listed = http_json(f"http://127.0.0.1:{replica.http_port}/v1/sessions", timeout=5)
        except OSError:
            continue
        out[replica.name] = [
            s["device_id"] for s in listed["sessions"] if s["finished_version"] is None
        ]
    return out


def real_edge_step(replicas: list[Replica]) -> tuple[Replica | None, int]:
    """The replica that serves real edge 0 now, and its step there."""
    for replica in replicas:
        try:
            listed = http_json(f"http://127.0.0.1:{replica.http_port}/v1/sessions", timeout=5)
        except OSError:
            continue
        for session in listed["sessions"]:
            if session["device_id"] == "real-edge-0" and session["finished_version"] is None:
                return replica, int(session["steps"])
    return None, 0


def start_simulated(address: str, args: argparse.Namespace) -> tuple[list[Any], Any, Any, Any]:
    names = [(f"sim-edge-{i:03d}", i % SHARDS) for i in range(args.edges)]
    groups = [names[p :: args.processes] for p in range(args.processes)]
    context = multiprocessing.get_context("spawn")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    workers = [
        context.Process(
            target=worker_main,
            args=(address, group, args.duration, args.timeout, ready, start, results, True),
        )
        for group in groups
    ]
    for worker in workers:
        worker.start()
    registered = sum(ready.get(timeout=600) for _ in workers)
    if registered != args.edges:
        raise SystemExit(f"only {registered} of {args.edges} simulated edges started")
    return workers, results, start, context


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_path = teacher(out)
    print("scale-check: reference run of the real edges (one cloud, undisturbed) …", flush=True)
    reference = reference_run(out, teacher_path, args.real_epochs)
    cluster = out / "cluster"
    store = cluster / "store"
    replicas = [
        start_replica(
            cluster, f"replica-{i}", teacher_path, str(store),
            lease_seconds=args.lease_seconds,
            extra_args=("--epochs", "1000", "--checkpoint-every", str(args.checkpoint_every)),
            env=ENV,
        )
        for i in range(args.replicas)
    ]  # fmt: skip
    envoy = start_envoy(cluster, [r.grpc_port for r in replicas])
    try:
        return _scenario(args, out, replicas, envoy, reference)
    finally:
        envoy.stop()
        for replica in replicas:
            replica.stop()


def _scenario(
    args: argparse.Namespace,
    out: Path,
    replicas: list[Replica],
    envoy: Envoy,
    reference: list[dict[str, Any]],
) -> dict[str, Any]:
    wait_replicas(replicas)
    deadline = time.monotonic() + 60
    while not (len(hosts := _hosts(envoy)) == len(replicas) and all(hosts.values())):
        if time.monotonic() > deadline:
            raise SystemExit(f"Envoy did not see every replica healthy: {hosts}")
        time.sleep(0.2)
    print(f"scale-check: {len(replicas)} replicas behind Envoy at {envoy.address}", flush=True)
    workers, results, start, _ = start_simulated(envoy.address, args)
    started = time.monotonic()
    start.set()
    edges = [real_edge(out, envoy.address, i, args.real_epochs) for i in range(REAL_EDGES)]
    victim, spread = _kill_when_due(args, replicas, edges, started)
    killed_at = time.time()
    print(f"scale-check: SIGKILLed {victim.name} ({len(spread[victim.name])} sessions)", flush=True)
    simulated: list[dict[str, Any]] = []
    for _ in workers:
        simulated.extend(results.get(timeout=args.duration + 900))
    for worker in workers:
        worker.join(60)
    real = finish_real_edges(out, edges)
    return summarize(args, spread, victim, killed_at, simulated, real, reference)


def _hosts(envoy: Envoy) -> dict[str, bool]:
    try:
        return envoy.healthy_hosts()
    except OSError:
        return {}


def _kill_when_due(
    args: argparse.Namespace,
    replicas: list[Replica],
    edges: list[subprocess.Popen[bytes]],
    started: float,
) -> tuple[Replica, dict[str, list[str]]]:
    """Wait until real edge 0 is well into training (or the run's middle); kill its replica."""
    while True:
        holder, step = real_edge_step(replicas)
        late = time.monotonic() - started > args.duration / 2
        if holder is not None and (step >= args.kill_at_step or late):
            break
        if edges[0].poll() is not None or time.monotonic() - started > args.duration:
            raise SystemExit("real edge 0 ended before the fault could be injected")
        time.sleep(0.2)
    spread = sessions_by_replica(replicas)
    holder.kill()
    return holder, spread


def summarize(
    args: argparse.Namespace,
    spread: dict[str, list[str]],
    victim: Replica,
    killed_at: float,
    simulated: list[dict[str, Any]],
    real: list[dict[str, Any]],
    reference: list[dict[str, Any]],
) -> dict[str, Any]:
    before, after = _split_latencies(simulated, killed_at)
    moved = set(spread[victim.name])
    waits = [_first_after(e, killed_at) for e in simulated if e["name"] in moved]
    counts = [len(v) for v in spread.values()]
    mismatched = [e for e in simulated if e["cloud_minus_edge"] != 0]
    real_rows = []
    for index, (report, expected) in enumerate(zip(real, reference, strict=True)):
        ok = not report.get("failed") and not expected.get("failed")
        real_rows.append({
            "edge": f"real-edge-{index}",
            "finished": not report.get("failed"),
            "accuracy": report["student"]["accuracy"] if ok else None,
            "reference_accuracy": expected["student"]["accuracy"] if ok else None,
            "resumes": report["faults"]["resumes"] if ok else None,
            "steps": report.get("steps"),
            "reference_steps": expected.get("steps"),
        })  # fmt: skip
    return {
        "replicas": args.replicas,
        "simulated_edges": args.edges,
        "real_edges": REAL_EDGES,
        "killed": victim.name,
        "sessions_per_replica_before_kill": {k: len(v) for k, v in spread.items()},
        "spread_max_over_min": round(max(counts) / max(1, min(counts)), 2),
        "failed_steps": sum(len(e["failures"]) for e in simulated)
        + sum(1 for r in real if r.get("failed")),
        "failures": [f for e in simulated for f in e["failures"]][:20],
        "steps_lost_or_doubled": sum(abs(e["cloud_minus_edge"] or 0) for e in mismatched)
        + sum(1 for e in simulated if e["registered"] and e["cloud_minus_edge"] is None),
        "simulated_steps": sum(e["steps"] for e in simulated),
        "retried_calls": sum(e["retries"] for e in simulated),
        "resumes": sum(e["resumes"] for e in simulated),
        "steps_trained_again": sum(e["redone"] for e in simulated),
        "moved_sessions_waited_seconds": {
            "max": round(max(waits), 2) if waits else None,
            "median": round(float(np.median(waits)), 2) if waits else None,
        },
        "step_latency_ms": {
            "before_kill": {"p50": percentile_ms(before, 50), "p99": percentile_ms(before, 99)},
            "after_kill": {"p50": percentile_ms(after, 50), "p99": percentile_ms(after, 99)},
        },
        "real": real_rows,
        "lease_seconds": args.lease_seconds,
        "checkpoint_every": args.checkpoint_every,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _split_latencies(
    simulated: list[dict[str, Any]], killed_at: float
) -> tuple[np.ndarray, np.ndarray]:
    """Step latencies answered before the kill, and after it."""
    pairs = [p for e in simulated for p in zip(e["latencies"], e["answered_at"], strict=True)]
    before = np.array([x for x, t in pairs if t < killed_at])
    return before, np.array([x for x, t in pairs if t >= killed_at])


def _first_after(edge: dict[str, Any], killed_at: float) -> float:
    """Seconds from the kill until this edge's first step answered after it."""
    later = [t for t in edge["answered_at"] if t >= killed_at]
    return (min(later) - killed_at) if later else math.inf


def verdict(report: dict[str, Any]) -> list[str]:
    """The issue's bars this run missed (none: it passed)."""
    missed = []
    if report["spread_max_over_min"] > 1.5:
        missed.append(f"sessions spread {report['spread_max_over_min']} > 1.5")
    if report["failed_steps"]:
        missed.append(f"{report['failed_steps']} failed steps")
    if report["steps_lost_or_doubled"]:
        missed.append(f"{report['steps_lost_or_doubled']} steps lost or applied twice")
    for row in report["real"]:
        if row["accuracy"] is None or abs(row["accuracy"] - row["reference_accuracy"]) > 0.005:
            missed.append(
                f"{row['edge']}: accuracy {row['accuracy']} vs {row['reference_accuracy']}"
            )
    return missed


def print_report(report: dict[str, Any], out: Path) -> None:
    latency = report["step_latency_ms"]
    waited = report["moved_sessions_waited_seconds"]
    rows = [
        ("replicas", f"{report['replicas']} behind Envoy (solo sessions: round robin, "
         "then sticky by x-splitkd-upstream), "
         f"lease {report['lease_seconds']:.0f} s, checkpoint every {report['checkpoint_every']} steps"),
        ("edges", f"{report['simulated_edges']} simulated + {report['real_edges']} real"),
        ("sessions/replica", ", ".join(f"{k} {v}" for k, v in
                                        report["sessions_per_replica_before_kill"].items())
         + f" (max/min {report['spread_max_over_min']})"),
        ("killed", f"{report['killed']} (SIGKILL)"),
        ("failed steps", str(report["failed_steps"])),
        ("lost/doubled", str(report["steps_lost_or_doubled"])),
        ("retries", f"{report['retried_calls']} calls retried, {report['resumes']} resumes, "
         f"{report['steps_trained_again']} steps trained again"),
        ("moved sessions", f"first step after the kill within {waited['median']} s (median), "
         f"{waited['max']} s (max)"),
        ("step latency", f"before the kill p50 {latency['before_kill']['p50']} ms, p99 "
         f"{latency['before_kill']['p99']} ms; after p50 {latency['after_kill']['p50']} ms, "
         f"p99 {latency['after_kill']['p99']} ms"),
    ]  # fmt: skip
    for row in report["real"]:
        rows.append((row["edge"], f"accuracy {row['accuracy']} vs {row['reference_accuracy']} "
                     f"undisturbed; {row['steps']} steps, {row['resumes']} resumes"))  # fmt: skip
    rows.append(("machine load", f"{report['machine']['load_average_1min_at_end']} "
                 f"(1-min average, {report['machine']['cpu_count']} cores)"))  # fmt: skip
    rows.append(("report", str(out / "report.json")))
    for label, value in rows:
        print(f"  {label + ':':<17} {value}")
    for failure in report["failures"][:5]:
        print(f"  failure: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--edges", type=int, default=32, help="simulated edges (default 32)")
    parser.add_argument("--processes", type=int, default=2, help="client worker processes")
    parser.add_argument(
        "--duration", type=float, default=90.0, help="seconds the simulated edges step"
    )
    parser.add_argument("--real-epochs", type=int, default=10, help="epochs of each real edge")
    parser.add_argument(
        "--kill-at-step", type=int, default=50, help="real edge 0's step at the kill"
    )
    parser.add_argument("--lease-seconds", type=float, default=3.0)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of one call, seconds")
    parser.add_argument("--out", default="runs/scale-check")
    args = parser.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report, out)
    missed = verdict(report)
    for line in missed:
        print(f"  MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
