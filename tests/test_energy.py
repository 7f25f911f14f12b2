"""The energy model: profiles load with sources, arithmetic follows docs/ENERGY.md."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from splitkd import energy
from splitkd.energy_counter import EnergyCounter
from splitkd.errors import InvalidArgument


def test_required_profiles_exist_and_every_figure_cites_a_source() -> None:
    assert {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "laptop-x86"} <= set(
        energy.devices()
    )
    assert {"ethernet", "wifi", "lte", "nb-iot"} <= set(energy.links())
    root = resources.files("splitkd").joinpath("profiles")
    for file, key in (("devices.json", "devices"), ("links.json", "links")):
        for name, raw in json.loads(root.joinpath(file).read_text())[key].items():
            figures = {k for k in raw if k not in ("description", "estimated", "sources")}
            assert figures <= set(raw["sources"]), f"{file}:{name} cites no source for some figures"
            assert all(raw["sources"][k].strip() for k in figures)


def test_unknown_profiles_name_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match="raspberry-pi-4"):
        energy.device_profile("toaster")
    with pytest.raises(InvalidArgument, match="nb-iot"):
        energy.link_profile("carrier-pigeon")


def test_meter_follows_the_documented_formula() -> None:
    pi = energy.device_profile("raspberry-pi-4")
    lte = energy.link_profile("lte")
    meter = energy.EnergyMeter(pi, lte)
    assert meter.compute(2.0) == pytest.approx(2.0 * pi.active_watts)
    assert meter.wait(3.0) == pytest.approx(3.0 * pi.idle_watts)
    # First transfer: bytes plus a promotion from idle.
    first = meter.transfer(1000, 500, start=10.0, end=10.1)
    expected = 1000 * lte.joules_per_byte_tx + 500 * lte.joules_per_byte_rx + lte.promotion_joules
    assert first == pytest.approx(expected)
    # 0.5 s later: still in the tail, so tail power for the gap and no promotion.
    second = meter.transfer(0, 0, start=10.6, end=10.7)
    assert second == pytest.approx(lte.tail_watts * 0.5)
    # After a long silence the whole tail was paid and the radio promotes again.
    third = meter.transfer(0, 0, start=10.7 + lte.tail_seconds + 5, end=100.0)
    assert third == pytest.approx(lte.tail_watts * lte.tail_seconds + lte.promotion_joules)
    assert meter.close() == pytest.approx(lte.tail_watts * lte.tail_seconds)
    assert meter.totals.total == pytest.approx(
        2.0 * pi.active_watts
        + 3.0 * pi.idle_watts
        + first
        + second
        + third
        + lte.tail_watts * lte.tail_seconds
    )


def test_a_wired_link_costs_less_radio_energy_than_lte_for_the_same_bytes() -> None:
    pi = energy.device_profile("raspberry-pi-4")
    costs = {}
    for link in ("ethernet", "wifi", "lte"):
        meter = energy.EnergyMeter(pi, energy.link_profile(link))
        for step in range(100):
            meter.transfer(80_000, 16_000, start=step * 0.02, end=step * 0.02 + 0.015)
        meter.close()
        costs[link] = meter.totals.radio
    assert costs["ethernet"] < costs["wifi"] < costs["lte"]


def _fake_sysfs(root: Path, kind: str, value: int) -> Path:
    """A sysfs tree of our own: no machine here has RAPL or a hwmon power sensor."""
    if kind == "rapl":
        zone = root / "class/powercap/intel-rapl:0"
        zone.mkdir(parents=True)
        (zone / "max_energy_range_uj").write_text("1000000\n")
        path = zone / "energy_uj"
    else:
        sensor = root / "class/hwmon/hwmon0"
        sensor.mkdir(parents=True)
        path = sensor / ("energy1_input" if kind == "hwmon-energy" else "power1_input")
    path.write_text(f"{value}\n")
    return path


def test_counter_reads_rapl_and_survives_wraparound(tmp_path: Path) -> None:
    path = _fake_sysfs(tmp_path, "rapl", 900_000)
    counter = EnergyCounter(tmp_path)
    assert counter.source == "rapl"
    path.write_text("950000\n")
    assert counter.joules() == pytest.approx(0.05)
    path.write_text("50000\n")  # wrapped at 1 J: +0.1 J
    assert counter.joules() == pytest.approx(0.15)


def test_counter_integrates_hwmon_power(tmp_path: Path) -> None:
    path = _fake_sysfs(tmp_path, "hwmon-power", 4_000_000)  # 4 W in microwatts
    now = [0.0]
    counter = EnergyCounter(tmp_path, clock=lambda: now[0])
    assert counter.source == "hwmon-power"
    now[0] = 2.0
    path.write_text("6000000\n")
    assert counter.joules() == pytest.approx(8.0)  # 4 W held for 2 s
    now[0] = 3.0
    assert counter.joules() == pytest.approx(14.0)  # then 6 W for 1 s


def test_counter_reads_hwmon_energy_and_is_absent_without_sensors(tmp_path: Path) -> None:
    path = _fake_sysfs(tmp_path / "a", "hwmon-energy", 1_000_000)
    counter = EnergyCounter(tmp_path / "a")
    path.write_text("3500000\n")
    assert counter.source == "hwmon-energy" and counter.joules() == pytest.approx(2.5)
    empty = EnergyCounter(tmp_path / "none")
    assert not empty.available and empty.joules() is None
