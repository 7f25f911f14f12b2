"""What one system reports for one (scenario, seed), and the registry of systems."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.compare.scenarios import RunContext


@dataclass
class DeviceResult:
    device: str
    shard: str
    accuracy: float  # the device's final model on its own held-out split
    union_accuracy: float  # the same model on the union of the devices' held-out splits
    bytes_up: int  # counted on the device's socket (relay), client to server
    bytes_down: int
    connections: int = 1
    device_class: str = "standard"  # splitkd.device_classes: the student it can hold


@dataclass
class SystemRun:
    devices: list[DeviceResult]
    seconds: float  # wall time from the devices' start to the last device's exit
    notes: dict[str, Any] = field(default_factory=dict)


# A system runs one (scenario, seed) end to end, every device behind its own
# counting relay, and reports per device.
System = Callable[[RunContext], SystemRun]
