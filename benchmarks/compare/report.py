"""Summaries over seeds: the table on stdout, report.json and the bar plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MB = 1e6


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (system, scenario): means over seeds of per-device means. A scenario
    whose devices are of several classes gets one more row per class, named
    ``scenario [class]``: the fleet's mean hides what the small devices got."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["system"], run["scenario"]), []).append(run)
    rows = []
    for (system, scenario), group in groups.items():
        rows.append(_row(system, scenario, group, None))
        classes = sorted({_class(d) for run in group for d in run["devices"]})
        if len(classes) > 1:
            rows += [_row(system, f"{scenario} [{c}]", group, c) for c in classes]
    return rows


def _class(device: dict[str, Any]) -> str:
    return str(device.get("device_class", "standard"))  # reports before device classes


def _row(
    system: str, scenario: str, group: list[dict[str, Any]], device_class: str | None
) -> dict[str, Any]:
    per_seed = [_per_seed(run, device_class) for run in group]
    accuracies = [s["accuracy"] for s in per_seed]
    return {
        "system": system,
        "scenario": scenario,
        "seeds": [run["seed"] for run in group],
        "accuracy": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "union_accuracy": statistics.fmean(s["union_accuracy"] for s in per_seed),
        "bytes_up_per_device": statistics.fmean(s["bytes_up"] for s in per_seed),
        "bytes_down_per_device": statistics.fmean(s["bytes_down"] for s in per_seed),
        "seconds": statistics.fmean(run["seconds"] for run in group),
    }


def _per_seed(run: dict[str, Any], device_class: str | None) -> dict[str, float]:
    devices = [d for d in run["devices"] if device_class in (None, _class(d))]
    return {
        key: statistics.fmean(d[key] for d in devices)
        for key in ("accuracy", "union_accuracy", "bytes_up", "bytes_down")
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "system",
        "scenario",
        "acc (device mean)",
        "acc (union)",
        "MB up/dev",
        "MB down/dev",
        "MB/dev",
        "seconds",
        "seeds",
    )
    lines = [header]
    for r in rows:
        total = (r["bytes_up_per_device"] + r["bytes_down_per_device"]) / MB
        lines.append(
            (
                r["system"],
                r["scenario"],
                f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}",
                f"{r['union_accuracy']:.4f}",
                f"{r['bytes_up_per_device'] / MB:.3f}",
                f"{r['bytes_down_per_device'] / MB:.3f}",
                f"{total:.3f}",
                f"{r['seconds']:.1f}",
                " ".join(map(str, r["seeds"])),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Bars per scenario and system: accuracy (device mean, union) and MB per device (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    by_key = {(r["system"], r["scenario"]): r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        xs = [j + i * width for j in range(len(scenarios))]
        picked = [by_key.get((system, s)) for s in scenarios]
        accuracy = [r["accuracy"] if r else 0.0 for r in picked]
        error = [r["accuracy_std"] if r else 0.0 for r in picked]
        union = [r["union_accuracy"] if r else 0.0 for r in picked]
        megabytes = [
            (r["bytes_up_per_device"] + r["bytes_down_per_device"]) / MB if r else 0.0
            for r in picked
        ]
        bars = left.bar(xs, accuracy, width, yerr=error, capsize=3, label=system)
        left.scatter(
            xs, union, marker="D", s=25, color="black", zorder=3, label="union" if i == 0 else None
        )
        right.bar(xs, megabytes, width, color=bars.patches[0].get_facecolor(), label=system)
        for x, mb in zip(xs, megabytes, strict=True):
            right.annotate(f"{mb:.2f}", (x, mb), ha="center", va="bottom", fontsize=8)
    for axis in (left, right):
        # Scenario names with a class ("noniid-4-a0.3-mixed [tiny]") are long: slanted.
        ticks = [j + 0.4 - width / 2 for j in range(len(scenarios))]
        axis.set_xticks(ticks, scenarios, rotation=15, ha="right", fontsize=8)
    lowest = min((r["union_accuracy"] for r in rows), default=0.5)
    left.set_ylim(max(0.0, min(lowest, min(r["accuracy"] for r in rows)) - 0.05), 1.0)
    left.set_ylabel("accuracy")
    left.set_title("device mean ± sd over seeds; ◆ on the union of held-out splits", fontsize=9)
    right.set_yscale("log")
    right.set_ylabel("MB per device (up + down)")
    right.set_title("bytes counted on each device's socket, mean over seeds", fontsize=9)
    left.legend(fontsize=8, loc="lower left")
    fig.suptitle("accuracy vs bytes per device, same shards (students: docs/COMPARE.md)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
