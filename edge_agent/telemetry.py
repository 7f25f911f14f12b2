"""What the edge records while it trains: energy estimate, measured energy, metrics.

``run.train`` feeds every step, evaluation and byte count here; this class
turns them into Prometheus metrics (when enabled) and the ``energy`` section
and per-step cumulative figures of the run report.
"""

from __future__ import annotations

import time
from typing import Any

from edge_agent.metrics import EdgeMetrics
from edge_agent.trainer import EvalRecord, StepRecord
from splitkd import energy
from splitkd.energy_counter import EnergyCounter


class TrainingTelemetry:
    def __init__(
        self,
        device_profile: str,
        link_profile: str,
        metrics: EdgeMetrics | None = None,
        counter: EnergyCounter | None = None,
    ) -> None:
        self.device = energy.device_profile(device_profile or energy.DEFAULT_DEVICE)
        self.link = energy.link_profile(link_profile or energy.DEFAULT_LINK)
        self.meter = energy.EnergyMeter(self.device, self.link)
        self.metrics = metrics
        self.counter = counter if counter is not None else EnergyCounter()
        self._measured_last = self.counter.joules() or 0.0
        self.step_bytes_up = 0
        self.step_bytes_down = 0
        self.all_bytes_up = 0
        self.all_bytes_down = 0
        # Cumulative estimated joules after each step, for the run report's plots
        # (a step repeated after a fault keeps its latest figure: energy spent
        # on the repeat is real and stays counted).
        self.cumulative_joules: dict[int, float] = {}
        # This process's step work, and what earlier processes of the same run spent
        # (restored from the edge checkpoint after a restart; see ``totals``).
        self.steps_run = 0
        self.step_seconds = {
            "forward_seconds": 0.0,
            "network_seconds": 0.0,
            "backward_seconds": 0.0,
        }
        self.earlier: dict[str, float] = {}

    def on_traffic(self, up: int, down: int) -> None:
        self.all_bytes_up += up
        self.all_bytes_down += down
        if self.metrics is not None:
            self.metrics.observe_traffic(up, down)

    def on_step(self, record: StepRecord) -> None:
        # Called right after the step's backward pass: the round trip ended
        # ``backward_seconds`` ago and lasted ``network_seconds``.
        end = time.monotonic() - record.backward_seconds
        compute = self.meter.compute(record.forward_seconds + record.backward_seconds)
        idle = self.meter.wait(record.network_seconds)
        radio = self.meter.transfer(
            record.bytes_up, record.bytes_down, end - record.network_seconds, end
        )
        self.step_bytes_up += record.bytes_up
        self.step_bytes_down += record.bytes_down
        self.steps_run += 1
        self.step_seconds["forward_seconds"] += record.forward_seconds
        self.step_seconds["network_seconds"] += record.network_seconds
        self.step_seconds["backward_seconds"] += record.backward_seconds
        self.cumulative_joules[record.step] = self.meter.totals.total
        if self.metrics is not None:
            self.metrics.observe_step(
                record.forward_seconds, record.network_seconds, record.backward_seconds, record.loss
            )
            self.metrics.observe_energy(compute, idle, radio)
            self._observe_measured()

    def on_eval(self, record: EvalRecord) -> None:
        if self.metrics is not None:
            self.metrics.observe_accuracy(record.accuracy)

    def _observe_measured(self) -> None:
        joules = self.counter.joules()
        if joules is not None and self.metrics is not None:
            self.metrics.observe_measured(max(0.0, joules - self._measured_last))
            self._measured_last = joules

    def finish(self) -> None:
        """Account for the calls outside the step loop and the radio's last tail."""
        up = max(0, self.all_bytes_up - self.step_bytes_up)
        down = max(0, self.all_bytes_down - self.step_bytes_down)
        now = time.monotonic()
        radio = self.meter.transfer(up, down, now, now) if up or down else 0.0
        radio += self.meter.close()
        if self.metrics is not None:
            self.metrics.observe_energy(0.0, 0.0, radio)
            self._observe_measured()

    def report(self) -> dict[str, Any]:
        measured = self.counter.joules()
        return {
            "device_profile": self.device.name,
            "link_profile": self.link.name,
            "estimate_joules": self.meter.totals.as_dict(),
            "measured_joules": measured,
            "measured_source": self.counter.source or None,
            "model": "docs/ENERGY.md",
        }

    def totals(
        self, bytes_up: int, bytes_down: int, calls: int, wall_seconds: float
    ) -> dict[str, float]:
        """The run's totals so far, earlier processes included: saved with each checkpoint."""
        energy_totals = self.meter.totals
        mine = {
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "calls": calls,
            "compute_joules": energy_totals.compute,
            "idle_joules": energy_totals.idle,
            "radio_joules": energy_totals.radio,
            "wall_seconds": wall_seconds,
            "steps_run": self.steps_run,
            **self.step_seconds,
        }
        return {k: float(v) + self.earlier.get(k, 0.0) for k, v in mine.items()}

    def add_earlier(self, report: dict[str, Any]) -> dict[str, Any]:
        """``report`` with the figures of the earlier processes of this run added in."""
        before = self.earlier
        if not before:
            return report
        traffic, timing = report["traffic"], report["timing"]
        for key in ("bytes_up", "bytes_down", "calls"):
            traffic[key] = traffic.get(key, 0) + int(before.get(key, 0))
        for key in self.step_seconds:
            timing[key] = timing.get(key, 0.0) + before.get(key, 0.0)
        joules = report["energy"]["estimate_joules"]
        for part in ("compute", "idle", "radio"):
            joules[part] = joules.get(part, 0.0) + before.get(f"{part}_joules", 0.0)
        joules["total"] = joules["compute"] + joules["idle"] + joules["radio"]
        report["wall_seconds"] += before.get("wall_seconds", 0.0)
        report["faults"]["earlier_processes"] = dict(before)
        report["faults"]["steps_run"] = int(before.get("steps_run", 0)) + self.steps_run
        return report
