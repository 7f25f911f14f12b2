"""Device energy estimate: compute + idle waiting + radio, from cited profiles.

energy = active_watts x busy compute seconds
       + idle_watts x seconds spent waiting for the cloud
       + radio: bytes x joules_per_byte (tx/rx) + promotion and tail overhead.

Profiles are data files (``splitkd/profiles/*.json``) whose every figure cites
a source; docs/ENERGY.md explains the model and its limits. numpy-free and
torch-free, so an inference-only edge can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from splitkd.errors import InvalidArgument

DEFAULT_DEVICE = "laptop-x86"
DEFAULT_LINK = "ethernet"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    active_watts: float
    idle_watts: float
    cpu_cores: int
    memory_bytes: int
    relative_compute_speed: float


@dataclass(frozen=True)
class LinkProfile:
    name: str
    description: str
    up_mbps: float
    down_mbps: float
    latency_ms: float  # one way
    jitter_ms: float
    joules_per_byte_tx: float
    joules_per_byte_rx: float
    promotion_joules: float
    tail_watts: float
    tail_seconds: float


def _load(name: str) -> dict[str, Any]:
    text = resources.files("splitkd").joinpath("profiles", name).read_text()
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def devices() -> dict[str, DeviceProfile]:
    out = {}
    for name, raw in _load("devices.json")["devices"].items():
        out[name] = DeviceProfile(
            name=name,
            description=raw["description"],
            active_watts=float(raw["active_watts"]),
            idle_watts=float(raw["idle_watts"]),
            cpu_cores=int(raw["cpu_cores"]),
            memory_bytes=int(raw["memory_bytes"]),
            relative_compute_speed=float(raw["relative_compute_speed"]),
        )
    return out


@cache
def links() -> dict[str, LinkProfile]:
    out = {}
    for name, raw in _load("links.json")["links"].items():
        out[name] = LinkProfile(
            name=name,
            description=raw["description"],
            up_mbps=float(raw["bandwidth_mbps"]["up"]),
            down_mbps=float(raw["bandwidth_mbps"]["down"]),
            latency_ms=float(raw["latency_ms"]),
            jitter_ms=float(raw["jitter_ms"]),
            joules_per_byte_tx=float(raw["joules_per_byte_tx"]),
            joules_per_byte_rx=float(raw["joules_per_byte_rx"]),
            promotion_joules=float(raw["promotion_joules"]),
            tail_watts=float(raw["tail_watts"]),
            tail_seconds=float(raw["tail_seconds"]),
        )
    return out


def device_profile(name: str) -> DeviceProfile:
    known = devices()
    if name not in known:
        raise InvalidArgument(f"unknown device profile {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def link_profile(name: str) -> LinkProfile:
    known = links()
    if name not in known:
        raise InvalidArgument(f"unknown link profile {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


@dataclass
class EnergyTotals:
    compute: float = 0.0
    idle: float = 0.0
    radio: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.idle + self.radio

    def as_dict(self) -> dict[str, float]:
        return {
            "compute": self.compute,
            "idle": self.idle,
            "radio": self.radio,
            "total": self.total,
        }


@dataclass
class EnergyMeter:
    """Accumulates the estimate as the edge computes, waits and transfers.

    Radio overhead follows the classic tail model (3G/LTE measurements): a
    transfer that starts after the radio went idle pays ``promotion_joules``;
    after every transfer the radio stays at ``tail_watts`` for up to
    ``tail_seconds``, cut short by the next transfer. Times are passed in, so
    the model is exact and testable without a clock.
    """

    device: DeviceProfile
    link: LinkProfile
    totals: EnergyTotals = field(default_factory=EnergyTotals)
    _last_transfer_end: float | None = None

    def compute(self, seconds: float) -> float:
        joules = self.device.active_watts * max(0.0, seconds)
        self.totals.compute += joules
        return joules

    def wait(self, seconds: float) -> float:
        joules = self.device.idle_watts * max(0.0, seconds)
        self.totals.idle += joules
        return joules

    def transfer(self, bytes_up: int, bytes_down: int, start: float, end: float) -> float:
        """One request/response exchange from ``start`` to ``end`` (seconds, any epoch)."""
        link = self.link
        joules = bytes_up * link.joules_per_byte_tx + bytes_down * link.joules_per_byte_rx
        if self._last_transfer_end is None:
            joules += link.promotion_joules
        else:
            gap = max(0.0, start - self._last_transfer_end)
            joules += link.tail_watts * min(gap, link.tail_seconds)
            if gap >= link.tail_seconds:
                joules += link.promotion_joules
        self._last_transfer_end = end
        self.totals.radio += joules
        return joules

    def close(self) -> float:
        """The tail after the last transfer; call once when the link goes quiet."""
        if self._last_transfer_end is None:
            return 0.0
        joules = self.link.tail_watts * self.link.tail_seconds
        self._last_transfer_end = None
        self.totals.radio += joules
        return joules
