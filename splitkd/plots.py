"""PNG plots of a run, written beside its report.json (needs the [plots] extra).

Input is the edge run report (``history``, ``evaluations``) of one or more
devices, so the same function serves ``splitkd-edge train`` (one device) and
``make demo`` (every device side by side).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a device or in CI

import matplotlib.pyplot as plt
import numpy as np

PHASES = (
    ("forward_seconds", "device forward"),
    ("network_seconds", "network round trip"),
    ("backward_seconds", "device backward"),
)


def _smooth(values: Sequence[float], window: int = 20) -> np.ndarray:
    """Moving median: one slow step must not hide the trend."""
    array = np.asarray(values, dtype=float)
    if len(array) <= window:
        return array
    padded = np.pad(array, (window // 2, window - window // 2 - 1), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    return np.median(windows, axis=1)


def _loss_accuracy(folder: Path, reports: Mapping[str, Mapping[str, Any]]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for device, report in reports.items():
        history = report.get("history", [])
        left.plot([h["step"] for h in history], _smooth([h["loss"] for h in history]), label=device)
        evaluations = report.get("evaluations", [])
        right.plot(
            [e["step"] for e in evaluations],
            [e["accuracy"] for e in evaluations],
            marker=".",
            label=f"{device} (split, held-out)",
        )
        if "student" in report:
            right.axhline(report["student"]["accuracy"], ls="--", lw=0.8, color="grey")
    left.set(title="KD loss per step (moving median)", xlabel="step", ylabel="loss")
    right.set(title="held-out accuracy (dashed: ONNX student)", xlabel="step", ylabel="accuracy")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return fig


def _latency(folder: Path, reports: Mapping[str, Mapping[str, Any]]) -> Any:
    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4), squeeze=False)
    for axis, (device, report) in zip(axes[0], reports.items(), strict=True):
        history = report.get("history", [])
        steps = [h["step"] for h in history]
        for key, label in PHASES:
            ms = [1000 * h[key] for h in history]
            axis.plot(steps, _smooth(ms), label=f"{label} (p95 {np.percentile(ms, 95):.2f} ms)")
        axis.set_yscale("log")
        axis.set(title=f"{device}: step latency by phase", xlabel="step", ylabel="milliseconds")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    return fig


def _traffic_energy(folder: Path, reports: Mapping[str, Mapping[str, Any]]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for device, report in reports.items():
        history = report.get("history", [])
        steps = [h["step"] for h in history]
        left.plot(steps, np.cumsum([h["bytes_up"] for h in history]) / 1e6, label=f"{device} up")
        left.plot(
            steps,
            np.cumsum([h["bytes_down"] for h in history]) / 1e6,
            ls="--",
            label=f"{device} down",
        )
        if history and "energy_joules" in history[0]:
            profile = report.get("energy", {})
            label = f"{device} ({profile.get('device_profile', '?')}, {profile.get('link_profile', '?')})"
            right.plot(steps, [h["energy_joules"] for h in history], label=label)
    left.set(title="cumulative traffic", xlabel="step", ylabel="MB")
    right.set(title="cumulative estimated device energy", xlabel="step", ylabel="joules")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(
    folder: Path, reports: Mapping[str, Mapping[str, Any]], prefix: str = ""
) -> list[Path]:
    """Write the run's plots into ``folder`` (names start with ``prefix``); return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if not reports:
        return []
    return [
        _save(_loss_accuracy(folder, reports), folder / f"{prefix}loss_accuracy.png"),
        _save(_latency(folder, reports), folder / f"{prefix}step_latency.png"),
        _save(_traffic_energy(folder, reports), folder / f"{prefix}traffic_energy.png"),
    ]
