"""``make loadtest``'s figures: each phase summarised, the runs side by side, the issue's figure.

Pure functions over the edges' results (no clock, no network): unit-tested.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1024 * 1024
# The figure: one replica with teacher micro-batching holds this many paced edges
# at this p99 step latency.
FIGURE_EDGES = 64
FIGURE_P99_MS = 50.0

_PHASE_TEXT = {
    "closed": "closed loop (each edge sends its next step as soon as the answer arrives)",
    "paced": "paced (each edge waits its device's compute and link time between steps)",
}


def describe_phase(name: str) -> str:
    return _PHASE_TEXT[name]


def percentile_ms(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2) if len(values) else math.nan


def latency_summary(latencies: np.ndarray) -> dict[str, float]:
    return {
        "p50": percentile_ms(latencies, 50),
        "p95": percentile_ms(latencies, 95),
        "p99": percentile_ms(latencies, 99),
        "max": round(float(latencies.max()) * 1000, 2) if len(latencies) else math.nan,
        "mean": round(float(latencies.mean()) * 1000, 2) if len(latencies) else math.nan,
    }


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """The ``q`` quantile (0-1) of a Prometheus histogram's cumulative bucket counts,
    interpolated linearly inside its bucket (as PromQL's histogram_quantile does)."""
    bounds = sorted(b for b in buckets if math.isfinite(b))
    total = buckets.get(math.inf, buckets[bounds[-1]] if bounds else 0.0)
    if total <= 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            share = (rank - below) / (count - below) if count > below else 1.0
            return lower + (bound - lower) * share
        lower, below = bound, count
    return bounds[-1] if bounds else math.nan  # beyond the last finite bound


def histogram_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """p50/p99 in ms of what a histogram recorded between two scrapes."""
    delta = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    return {
        name: round(histogram_quantile(delta, q) * 1000, 2)
        for name, q in (("p50", 0.5), ("p99", 0.99))
    }


def cpu_usage(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Cores used between two snapshots: the replica, the client processes, the rest."""
    seconds = after["at"] - before["at"]
    cpus = float(os.cpu_count() or 0)
    if seconds <= 0:
        nan = math.nan
        return dict.fromkeys(("replica", "generator", "other", "idle"), nan) | {
            "seconds": 0.0,
            "machine_cpus": cpus,
        }
    cores = {k: (after[k] - before[k]) / seconds for k in ("replica", "generator", "machine")}
    return {
        "seconds": round(seconds, 2),
        "replica": round(cores["replica"], 2),
        "generator": round(cores["generator"], 2),
        # Everything else busy on the machine: other people's work, this script's parent.
        "other": round(max(0.0, cores["machine"] - cores["replica"] - cores["generator"]), 2),
        # Idle while the replica was saturated: the clients did not starve it of CPU.
        "idle": round(max(0.0, cpus - cores["machine"]), 2),
        "machine_cpus": cpus,
    }


def summarise_phase(
    phase: Any, edges: list[dict[str, Any]], usage: dict[str, float], mix: Any = None
) -> dict[str, Any]:
    latencies = np.array([s for e in edges for s in e["latencies"]])
    steps = sum(e["steps"] for e in edges)
    failures = [f for e in edges for f in e["failures"]]
    # The window the edges stepped in: the phase's duration (or less if it ended early).
    window = min(usage["seconds"], phase.duration) or phase.duration
    report: dict[str, Any] = {
        "phase": phase.name,
        "edges_stepping": len(edges),
        "duration_seconds": phase.duration,
        "total_steps": steps,
        "failed_steps": len(failures),
        "failures": failures[:50],
        "steps_per_second": round(steps / window, 2),
        "step_latency_ms": latency_summary(latencies),
        "steps_per_edge": {
            "min": min((e["steps"] for e in edges), default=0),
            "max": max((e["steps"] for e in edges), default=0),
        },
        "cpu_cores": usage,
    }
    if phase.name == "paced":
        report["pacing"] = pacing_summary(edges, window)
    return report


def pacing_summary(edges: list[dict[str, Any]], window: float) -> dict[str, Any]:
    """What the edges asked of the cloud and whether this host kept their pace."""
    paced = [e for e in edges if e.get("pace_seconds")]
    pauses = sum(e["pauses"] for e in paced)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for edge in paced:
        groups[edge["profile"]].append(edge)
    return {
        # The steps/s the edges would send if the cloud answered in no time.
        "offered_steps_per_second": round(sum(1 / e["pace_seconds"] for e in paced), 1),
        # The least they send if every step took the figure's bound: what holding them
        # at p99 <= the bound asks of the cloud at the very least.
        "needed_steps_per_second": round(needed_rate([e["pace_seconds"] for e in paced]), 1),
        "late_pause_share": round(sum(e["late_pauses"] for e in paced) / pauses, 4)
        if pauses
        else 0.0,
        "profiles": {
            label: {
                "edges": len(group),
                "pause_ms": round(1000 * float(np.mean([e["pace_seconds"] for e in group])), 2),
                "steps_per_second": round(sum(e["steps"] for e in group) / window, 2),
                "step_latency_ms": latency_summary(
                    np.array([s for e in group for s in e["latencies"]])
                ),
            }
            for label, group in sorted(groups.items())
        },
    }


def needed_rate(pauses: list[float], bound_ms: float = FIGURE_P99_MS) -> float:
    """Steps/s edges with these mean pauses send when each step takes ``bound_ms``: an
    edge's cycle is its pause plus the step, so faster answers only raise the rate."""
    return sum(1 / (pause + bound_ms / 1000) for pause in pauses)


def demand(phase: dict[str, Any]) -> dict[str, float] | None:
    """What holding a paced phase's edges at the bound takes, at its measured CPU per step:
    the replica's cores and the simulated edges' cores (None: no steps or no pacing)."""
    pacing = phase.get("pacing")
    rate = phase["steps_per_second"]
    if not pacing or rate <= 0:
        return None
    needed = pacing["needed_steps_per_second"]
    cpu = phase["cpu_cores"]
    replica_ms, edges_ms = 1000 * cpu["replica"] / rate, 1000 * cpu["generator"] / rate
    return {
        "needed_steps_per_second": needed,
        "replica_cpu_ms_per_step": round(replica_ms, 3),
        "edges_cpu_ms_per_step": round(edges_ms, 3),
        "replica_cores_needed": round(needed * replica_ms / 1000, 2),
        "edges_cores_needed": round(needed * edges_ms / 1000, 2),
    }


def figure(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's figure from this run's reports: met, and the closed-loop baseline."""

    def phase(batching: bool, name: str) -> dict[str, Any] | None:
        for report in reports:
            if report["teacher_batching"] == batching and name in report["phases"]:
                return dict(report["phases"][name], edges=report["edges_registered"])
        return None

    paced = phase(True, "paced")
    met = None
    if paced is not None:
        met = (
            paced["edges"] >= FIGURE_EDGES
            and paced["failed_steps"] == 0
            and paced["step_latency_ms"]["p99"] <= FIGURE_P99_MS
        )
    return {
        "met": met,
        "paced_batched": paced,
        "baseline": phase(False, "closed"),
        "closed_batched": phase(True, "closed"),
        "demand": demand(paced) if paced is not None else None,
        "capacity": {
            ("micro-batched" if r["teacher_batching"] else "one per step"): capacity(r)
            for r in reports
        },
    }


def capacity(report: dict[str, Any]) -> dict[str, float] | None:
    """The most paced edges this run held at p99 <= the figure's bound with no failed step,
    and the steps/s the replica served them (the capacity points and the full paced phase;
    None: no paced phase, or none held). That rate sizes the autoscaler's target."""
    held = [
        phase
        for phase in report["phases"].values()
        if phase["phase"] == "paced"
        and phase["failed_steps"] == 0
        and phase["step_latency_ms"]["p99"] <= FIGURE_P99_MS
    ]
    if not held:
        return None
    best = max(held, key=lambda phase: phase["edges_stepping"])
    return {"edges": best["edges_stepping"], "steps_per_second": best["steps_per_second"]}


def print_report(report: dict[str, Any], out: Path) -> None:
    rss = report["cloud_rss_bytes"]
    pinning = report["pinning"]
    if pinning["replica"] is None:
        pinned = "none: the replica, the client processes and other work share every CPU"
    else:
        pinned = f"replica on CPU {pinning['replica']}, client processes on {pinning['generator']}"
    lines = [
        ("batching", "teacher tails micro-batched across sessions" if report["teacher_batching"]
         else "one teacher pass per step (--no-teacher-batching)"),
        ("edges", f"{report['edges']} ({report['edges_registered']} registered, "
         f"{report['worker_processes']} client processes, one async gRPC channel each)"),
        ("pinning", pinned),
        ("cloud RSS", f"start {rss['start'] / MIB:.1f} MiB, after register "
         f"{rss['after_register'] / MIB:.1f} MiB, peak {rss['peak'] / MIB:.1f} MiB, "
         f"end {rss['end'] / MIB:.1f} MiB"),
        ("machine load", f"1-min load average {report['machine']['load_average_1min_at_start']} "
         f"at start, {report['machine']['load_average_1min_at_end']} at end"),
        ("report", str(out / "report.json")),
    ]  # fmt: skip
    for label, value in lines:
        print(f"  {label + ':':<14} {value}")
    for phase in report["phases"].values():
        print_phase(phase)


def print_phase(phase: dict[str, Any]) -> None:
    latency, cpu = phase["step_latency_ms"], phase["cpu_cores"]
    print(
        f"  {describe_phase(phase['phase'])}, {phase.get('edges_stepping', '?')} edges, "
        f"{phase['duration_seconds']:.0f} s:"
    )
    print(
        f"    {phase['total_steps']} steps (per edge {phase['steps_per_edge']['min']}-"
        f"{phase['steps_per_edge']['max']}), {phase['failed_steps']} failed, "
        f"{phase['steps_per_second']:.1f} steps/s"
    )
    print(
        f"    step latency p50 {latency['p50']:.1f} ms, p95 {latency['p95']:.1f} ms, "
        f"p99 {latency['p99']:.1f} ms (max {latency['max']:.1f} ms)"
    )
    handler = phase.get("handler_latency_ms")
    if handler:
        print(
            f"    in the replica's Step handler (its own histogram): p50 {handler['p50']:.1f} ms, "
            f"p99 {handler['p99']:.1f} ms"
        )
    print(
        f"    CPU cores: replica {cpu['replica']}, client processes {cpu['generator']}, "
        f"other work {cpu['other']}, idle {cpu['idle']} (of {cpu['machine_cpus']:.0f})"
    )
    pacing = phase.get("pacing")
    if pacing:
        print(
            f"    offered: {pacing['offered_steps_per_second']} steps/s if the cloud answered "
            f"at once; pauses this host could not keep: {100 * pacing['late_pause_share']:.1f} %"
        )
        for label, group in pacing["profiles"].items():
            lat = group["step_latency_ms"]
            print(
                f"    {label:<26} {group['edges']:>3} edges, pause {group['pause_ms']:>7.1f} ms: "
                f"{group['steps_per_second']:>6.1f} steps/s, p50 {lat['p50']:.1f} ms, "
                f"p99 {lat['p99']:.1f} ms"
            )
    for failure in phase["failures"][:10]:
        print(f"    failure: {failure}")


def print_comparison(reports: list[dict[str, Any]]) -> None:
    """Every phase of every run, one row each; p99 as the edges saw it and in the handler."""
    print(
        f"\n  {'phase':<10} {'edges':>5} {'teacher passes':<15} {'steps/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'handler p99':>11} {'failed':>6} {'replica CPU':>11} {'clients CPU':>11}"
    )
    keys = list(dict.fromkeys(key for r in reports for key in r["phases"]))
    for key in keys:
        for r in reports:
            phase = r["phases"].get(key)
            if phase is None:
                continue
            label = "micro-batched" if r["teacher_batching"] else "one per step"
            latency, cpu = phase["step_latency_ms"], phase["cpu_cores"]
            handler = phase.get("handler_latency_ms", {}).get("p99", math.nan)
            print(
                f"  {phase['phase']:<10} {phase.get('edges_stepping', 0):>5} {label:<15} "
                f"{phase['steps_per_second']:>8.1f} {latency['p50']:>7.1f} {latency['p99']:>7.1f} "
                f"{handler:>11.1f} {phase['failed_steps']:>6} {cpu['replica']:>11} "
                f"{cpu['generator']:>11}"
            )


def print_figure(reports: list[dict[str, Any]], edges: int) -> None:
    result = figure(reports)
    paced, baseline = result["paced_batched"], result["baseline"]
    wanted = f">= {FIGURE_EDGES} paced edges at p99 <= {FIGURE_P99_MS:.0f} ms, micro-batched"
    if paced is None:
        print(f"\n  figure ({wanted}): not measured (needs --batching on/both, --phase paced/both)")
    else:
        verdict = "MET" if result["met"] else "NOT MET"
        print(
            f"\n  figure ({wanted}): {verdict}: p99 {paced['step_latency_ms']['p99']:.1f} ms, "
            f"{paced['steps_per_second']:.1f} steps/s, {paced['failed_steps']} failed "
            f"at {paced['edges']} paced edges"
        )
    need = result["demand"]
    if need is not None and paced is not None:
        cores = need["replica_cores_needed"] + need["edges_cores_needed"]
        print(
            f"  what {paced['edges']} paced edges at p99 <= {FIGURE_P99_MS:.0f} ms ask: at least "
            f"{need['needed_steps_per_second']:.0f} steps/s (each edge's pause + "
            f"{FIGURE_P99_MS:.0f} ms a step); at this run's CPU per step (replica "
            f"{need['replica_cpu_ms_per_step']:.2f} ms, simulated edges "
            f"{need['edges_cpu_ms_per_step']:.2f} ms) that is {need['replica_cores_needed']:.2f} "
            f"cores for the replica and {need['edges_cores_needed']:.2f} for the edges: "
            f"{cores:.2f} of this machine's {os.cpu_count()}"
        )
    for label, held in result["capacity"].items():
        text = "none" if held is None else (
            f"{held['edges']:.0f} edges ({held['steps_per_second']:.0f} steps/s)"
        )  # fmt: skip
        print(
            f"  capacity, {label}: {text} of the paced edges measured held at p99 <= "
            f"{FIGURE_P99_MS:.0f} ms (the points: --capacity)"
        )
    for label, phase in (
        ("baseline, closed loop, one teacher pass per step", baseline),
        ("closed loop, micro-batched", result["closed_batched"]),
    ):
        if phase is not None:
            print(
                f"  {label} ({edges} edges): {phase['steps_per_second']:.1f} steps/s, "
                f"p99 {phase['step_latency_ms']['p99']:.1f} ms"
            )
