"""Measured energy where the machine has a real counter, beside the estimate.

Two Linux sources, tried in this order:

- powercap / RAPL (x86): ``/sys/class/powercap/intel-rapl:N/energy_uj``, a
  cumulative microjoule counter per CPU package that wraps at
  ``max_energy_range_uj``;
- hwmon (e.g. an INA219/INA226 on a Raspberry Pi's supply): ``energyN_input``
  (cumulative microjoules) or, failing that, ``powerN_input`` (microwatts),
  integrated over the time between two reads.

The sysfs root is a parameter so that tests can point it at a tree of their
own: no machine here has either sensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class EnergyCounter:
    """``joules()`` since creation, or ``None`` when the machine has no counter."""

    def __init__(
        self, sysfs: Path = Path("/sys"), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.source = ""
        self._total_uj = 0.0
        self._rapl: list[tuple[Path, int, int]] = []  # (energy_uj, wrap, last)
        self._hwmon_energy: list[tuple[Path, int]] = []
        self._hwmon_power: list[tuple[Path, int]] = []
        self._last_time = clock()
        for zone in sorted((sysfs / "class/powercap").glob("intel-rapl:[0-9]")):
            value = _read_int(zone / "energy_uj")
            if value is not None:
                wrap = _read_int(zone / "max_energy_range_uj") or 0
                self._rapl.append((zone / "energy_uj", wrap, value))
        if self._rapl:
            self.source = "rapl"
            return
        for hwmon in sorted((sysfs / "class/hwmon").glob("hwmon*")):
            for sensor in sorted(hwmon.glob("energy*_input")):
                if (value := _read_int(sensor)) is not None:
                    self._hwmon_energy.append((sensor, value))
            for sensor in sorted(hwmon.glob("power*_input")):
                if (value := _read_int(sensor)) is not None:
                    self._hwmon_power.append((sensor, value))
        if self._hwmon_energy:
            self.source = "hwmon-energy"
        elif self._hwmon_power:
            self.source = "hwmon-power"

    @property
    def available(self) -> bool:
        return bool(self.source)

    def joules(self) -> float | None:
        """Read the counters now; total joules since this object was made."""
        if not self.source:
            return None
        now = self._clock()
        if self._rapl:
            updated = []
            for path, wrap, last in self._rapl:
                value = _read_int(path)
                if value is None:
                    value = last
                delta = value - last
                if delta < 0 and wrap:  # the counter wrapped around
                    delta += wrap
                self._total_uj += max(0, delta)
                updated.append((path, wrap, value))
            self._rapl = updated
        elif self._hwmon_energy:
            updated_energy = []
            for path, last in self._hwmon_energy:
                value = _read_int(path)
                value = last if value is None else value
                self._total_uj += max(0, value - last)
                updated_energy.append((path, value))
            self._hwmon_energy = updated_energy
        else:
            # Power in microwatts, held since the last read (left Riemann sum):
            # read often (every step) for a good integral.
            elapsed = now - self._last_time
            updated_power = []
            for path, last in self._hwmon_power:
                self._total_uj += last * elapsed
                value = _read_int(path)
                updated_power.append((path, last if value is None else value))
            self._hwmon_power = updated_power
        self._last_time = now
        return self._total_uj / 1e6
