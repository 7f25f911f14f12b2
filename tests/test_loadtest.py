"""make loadtest's arithmetic: the paced edges' pauses from the profiles, its figures.

No clock and no network: the benchmark itself runs in ``make loadtest``.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import pacing
from benchmarks.loadtest_report import (
    FIGURE_P99_MS,
    capacity,
    cpu_usage,
    demand,
    figure,
    histogram_quantile,
    histogram_summary,
    needed_rate,
    percentile_ms,
    summarise_phase,
)
from splitkd import energy
from splitkd.demo import DEMO_PROFILES
from splitkd.errors import InvalidArgument
from splitkd.flops import forward_flops
from splitkd.models import zoo
from splitkd.signature import DatasetSignature

UP, DOWN = 82_000, 16_500  # a loadtest step's bytes, about


def test_pause_is_device_compute_plus_link_time_from_the_profiles() -> None:
    pace = pacing.make_pace(("raspberry-pi-4", "wifi"), 2e6, UP, DOWN)
    wifi = energy.link_profile("wifi")
    compute = 2e6 / pacing.REFERENCE_FLOPS_PER_SECOND  # the reference device: speed 1.0
    link = (
        2 * wifi.latency_ms / 1000
        + UP * 8 / (wifi.up_mbps * 1e6)
        + DOWN * 8 / (wifi.down_mbps * 1e6)
    )
    assert pace.compute_seconds == pytest.approx(compute)
    assert pace.mean_seconds == pytest.approx(compute + link)
    assert pace.label == "raspberry-pi-4/wifi"


def test_a_faster_device_and_link_pause_less() -> None:
    pi4 = pacing.make_pace(("raspberry-pi-4", "lte"), 2e6, UP, DOWN)
    pi5 = pacing.make_pace(("raspberry-pi-5", "lte"), 2e6, UP, DOWN)
    speed = energy.device_profile("raspberry-pi-5").relative_compute_speed
    assert pi5.compute_seconds == pytest.approx(pi4.compute_seconds / speed)
    ethernet = pacing.make_pace(("raspberry-pi-5", "ethernet"), 2e6, UP, DOWN)
    assert ethernet.mean_seconds < pi5.mean_seconds


def test_step_flops_of_the_default_session_train_the_student_head_and_run_the_teacher_head() -> (
    None
):
    signature = DatasetSignature((1, 8, 8), 10, "digits")
    student = forward_flops(zoo.default_student(signature), 0, 1)
    teacher = forward_flops(zoo.default_teacher(signature), 0, 1)
    assert student > 0 and teacher > 0
    assert pacing.step_flops(student, teacher, 32) == 32 * (3 * student + teacher)


def test_sampled_pauses_jitter_within_the_profiles_bounds() -> None:
    pace = pacing.make_pace(("jetson-nano", "lte"), 2e6, UP, DOWN)
    lte = energy.link_profile("lte")
    rng = random.Random(0)
    samples = [pace.sample(rng) for _ in range(2000)]
    low = pace.compute_seconds * 0.9 + pace.link_seconds(lte.latency_ms - lte.jitter_ms)
    high = pace.compute_seconds * 1.1 + pace.link_seconds(lte.latency_ms + lte.jitter_ms)
    assert all(low <= s <= high for s in samples)
    assert len(set(samples)) == len(samples)  # no lockstep
    assert np.mean(samples) == pytest.approx(pace.mean_seconds, rel=0.02)


def test_latency_never_goes_below_zero_with_a_large_jitter() -> None:
    pace = pacing.make_pace(("raspberry-pi-4", "nb-iot"), 0.0, 0, 0)
    rng = random.Random(1)
    assert min(pace.sample(rng) for _ in range(500)) >= 0.0


def test_the_default_mix_is_the_demos_and_a_mix_is_checked() -> None:
    assert list(DEMO_PROFILES) == pacing.DEMO_MIX
    assert pacing.parse_mix("raspberry-pi-4/wifi, jetson-nano/lte") == [
        ("raspberry-pi-4", "wifi"),
        ("jetson-nano", "lte"),
    ]
    with pytest.raises(InvalidArgument, match="unknown link profile"):
        pacing.parse_mix("raspberry-pi-4/carrier-pigeon")


def test_percentiles_in_milliseconds() -> None:
    values = np.arange(1, 101) / 1000  # 1..100 ms
    assert percentile_ms(values, 50) == pytest.approx(50.5)
    assert percentile_ms(values, 99) == pytest.approx(99.01)
    assert math.isnan(percentile_ms(np.array([]), 99))


def test_cpu_usage_splits_the_machine_between_replica_clients_and_the_rest() -> None:
    before = {"replica": 10.0, "generator": 5.0, "machine": 100.0, "at": 0.0}
    after = {"replica": 25.0, "generator": 10.0, "machine": 140.0, "at": 20.0}
    usage = cpu_usage(before, after)
    assert (usage["replica"], usage["generator"], usage["other"]) == (0.75, 0.25, 1.0)
    assert usage["idle"] == max(0.0, usage["machine_cpus"] - 2.0)


def _edge(profile: str, pace: float, latencies: list[float], late: int = 0) -> dict[str, object]:
    return {
        "profile": profile,
        "pace_seconds": pace,
        "pauses": len(latencies),
        "late_pauses": late,
        "latencies": latencies,
        "steps": len(latencies),
        "failures": [],
    }


def test_a_paced_phase_summary_per_profile_and_offered_load() -> None:
    edges = [_edge("pi/wifi", 0.04, [0.01] * 10), _edge("pi/lte", 0.2, [0.03] * 10, late=5)]
    usage = {"seconds": 10.0, "replica": 1.0, "generator": 0.2, "other": 0.1}
    report = summarise_phase(SimpleNamespace(name="paced", duration=10.0), edges, usage)
    assert report["steps_per_second"] == 2.0
    pacing_report = report["pacing"]
    assert pacing_report["offered_steps_per_second"] == pytest.approx(25 + 5)
    bound = FIGURE_P99_MS / 1000
    assert pacing_report["needed_steps_per_second"] == pytest.approx(
        1 / (0.04 + bound) + 1 / (0.2 + bound), abs=0.1
    )
    assert pacing_report["late_pause_share"] == 0.25
    assert pacing_report["profiles"]["pi/lte"]["step_latency_ms"]["p99"] == pytest.approx(30)


def _run(batching: bool, closed_p99: float, paced_p99: float, edges: int = 64) -> dict:
    def phase(name: str, p99: float) -> dict:
        return {
            "phase": name,
            "edges_stepping": edges,
            "step_latency_ms": {"p99": p99},
            "failed_steps": 0,
            "steps_per_second": 100.0,
        }

    return {
        "teacher_batching": batching,
        "edges_registered": edges,
        "phases": {"closed": phase("closed", closed_p99), "paced": phase("paced", paced_p99)},
    }


def test_the_figure_is_the_paced_micro_batched_p99_at_64_edges() -> None:
    under, over = FIGURE_P99_MS - 1, FIGURE_P99_MS + 1
    met = figure([_run(False, 1900, over), _run(True, 700, under)])
    assert met["met"] is True
    assert met["baseline"]["step_latency_ms"]["p99"] == 1900
    assert figure([_run(False, 1900, under), _run(True, 700, over)])["met"] is False
    assert figure([_run(True, 700, under, edges=32)])["met"] is False
    assert figure([_run(False, 1900, under)])["met"] is None
    held = figure([_run(False, 1900, over), _run(True, 700, under)])["capacity"]
    assert held == {"one per step": None, "micro-batched": {"edges": 64, "steps_per_second": 100}}


def test_simulated_edges_send_the_teacher_side_once_per_sample_like_a_real_edge() -> None:
    """The load test's edges use the cloud's teacher-output cache as a real edge does:
    a batch the cloud holds goes up as sample ids and student activations only."""
    import torch

    from benchmarks.loadtest import SimulatedEdge
    from splitkd import codec
    from splitkd.v1 import splitkd_pb2 as pb

    edge = SimulatedEdge.__new__(SimulatedEdge)
    edge.session_id, edge.step, edge.wire_dtype = "s" * 32, 7, pb.DTYPE_FLOAT32
    edge.data = SimpleNamespace(y=np.arange(10) % 3)
    edge.cached = np.zeros(10, dtype=bool)
    index = np.array([1, 4, 5])
    student, teacher = torch.ones(3, 2), torch.zeros(3, 4)
    first = edge._step_request(student, teacher, index)
    assert first.HasField("teacher_activations") and first.HasField("labels")
    assert codec.decode(first.sample_ids, shape=(3,)).tolist() == [1, 4, 5]
    held = edge._step_request(student, None, index)
    assert not held.HasField("teacher_activations") and not held.HasField("labels")
    assert held.HasField("sample_ids") and held.HasField("student_activations")
    edge.cached = None  # no cache granted: the old wire, teacher side every step, no ids
    plain = edge._step_request(student, teacher, index)
    assert plain.HasField("teacher_activations") and not plain.HasField("sample_ids")


def test_the_demand_of_the_figure_in_steps_and_cores_from_the_measured_cpu_per_step() -> None:
    """64 edges pausing 1 ms need >= 64 / 51 ms steps/s at p99 <= 50 ms; at 2 ms of
    replica CPU a step that is 2.5 cores, more than a 2-core replica has."""
    assert needed_rate([0.001] * 64) == pytest.approx(64 / 0.051)
    assert needed_rate([0.001] * 64, bound_ms=0) == pytest.approx(64_000)
    phase = {
        "steps_per_second": 400.0,
        "cpu_cores": {"replica": 0.8, "generator": 0.4},
        "pacing": {"needed_steps_per_second": 1255.0},
    }
    need = demand(phase)
    assert need is not None
    assert need["replica_cpu_ms_per_step"] == pytest.approx(2.0)
    assert need["edges_cpu_ms_per_step"] == pytest.approx(1.0)
    assert need["replica_cores_needed"] == pytest.approx(2.51)
    assert need["edges_cores_needed"] == pytest.approx(1.255, abs=0.01)
    assert demand(dict(phase, steps_per_second=0.0)) is None
    assert demand({"steps_per_second": 1.0, "cpu_cores": {}}) is None


def test_capacity_is_the_most_paced_edges_held_at_the_bound_without_failures() -> None:
    def paced(edges: int, p99: float, failed: int = 0) -> dict:
        return {
            "phase": "paced",
            "edges_stepping": edges,
            "steps_per_second": 10.0 * edges,
            "failed_steps": failed,
            "step_latency_ms": {"p99": p99},
        }

    closed = dict(paced(64, 1.0), phase="closed")  # a closed loop never counts
    phases = {"closed": closed, "paced": paced(64, 400), "paced-8": paced(8, 30),
              "paced-16": paced(16, 49), "paced-24": paced(24, 20, failed=1)}  # fmt: skip
    assert capacity({"phases": phases}) == {"edges": 16, "steps_per_second": 160.0}
    assert capacity({"phases": {"paced": paced(64, 51)}}) is None


def test_a_histograms_quantile_interpolates_inside_its_bucket() -> None:
    buckets = {0.01: 50.0, 0.05: 90.0, 0.1: 100.0, math.inf: 100.0}
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.01)
    assert histogram_quantile(buckets, 0.7) == pytest.approx(0.03)
    assert histogram_quantile(buckets, 0.99) == pytest.approx(0.095)
    assert math.isnan(histogram_quantile({}, 0.5))
    # Between two scrapes: 10 new calls <= 10 ms, 10 in 10-50 ms, 10 in 50-100 ms.
    before = {0.01: 40.0, 0.05: 80.0, 0.1: 90.0, math.inf: 90.0}
    summary = histogram_summary(before, {0.01: 50.0, 0.05: 100.0, 0.1: 120.0, math.inf: 120.0})
    assert summary == {"p50": pytest.approx(30.0), "p99": pytest.approx(98.5)}
