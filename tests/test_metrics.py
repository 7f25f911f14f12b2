"""Metrics on both sides count what happened, with bounded labels and base units."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.metrics import EdgeMetrics
from edge_agent.telemetry import TrainingTelemetry
from edge_agent.trainer import EvalRecord, StepRecord
from splitkd.energy_counter import EnergyCounter
from splitkd.telemetry import exposition
from tests.support import RPC_TIMEOUT, LiveCloud
from tests.test_grpc_errors import register, step_request


def samples(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    text = exposition(registry)[0].decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_cloud_counts_steps_rpcs_bytes_and_sessions(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    request = step_request(session, 0)
    live_cloud.stub.Step(request, timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.RpcError):
        live_cloud.stub.Step(step_request(session, 5), timeout=RPC_TIMEOUT)  # out of order
    live_cloud.stub.Step(request, timeout=RPC_TIMEOUT)  # a retry: replayed, not a new step
    got = samples(live_cloud.service.metrics.registry)
    assert got[("splitkd_cloud_training_steps_total", ())] == 1
    assert got[("splitkd_cloud_sessions", ())] == 1
    ok = (("code", "OK"), ("method", "Step"))
    assert got[("splitkd_cloud_rpc_duration_seconds_count", ok)] == 2
    refused = (("code", "FAILED_PRECONDITION"), ("method", "Step"))
    assert got[("splitkd_cloud_rpc_duration_seconds_count", refused)] == 1
    raw = len(request.student_activations.data) + len(request.teacher_activations.data)
    assert got[("splitkd_cloud_received_bytes_total", (("method", "Step"),))] >= 3 * raw
    assert got[("splitkd_cloud_compute_duration_seconds_count", (("model", "teacher"),))] == 1
    # No label carries a session or device id.
    for _, labels in got:
        assert all(key in {"method", "code", "model", "kind", "le"} for key, _ in labels)


def _record(step: int, up: int = 1000, down: int = 400) -> StepRecord:
    return StepRecord(
        step=step, epoch=0, batch=32, loss=1.5 - step * 0.1, kd_loss=1.0, ce_loss=0.5, correct=10,
        forward_seconds=0.002, network_seconds=0.01, backward_seconds=0.001,
        bytes_up=up, bytes_down=down,
    )  # fmt: skip


def test_edge_telemetry_feeds_metrics_and_the_energy_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The radio model reads the clock; the test's clock spaces the steps as a device would.
    now = [100.0]
    monkeypatch.setattr("edge_agent.telemetry.time", SimpleNamespace(monotonic=lambda: now[0]))
    metrics = EdgeMetrics(inference=False)
    telemetry = TrainingTelemetry("raspberry-pi-4", "wifi", metrics, EnergyCounter(tmp_path))
    metrics.describe_device("pi-7", "raspberry-pi-4", "wifi")
    for step in range(3):
        telemetry.on_traffic(1000, 400)
        telemetry.on_step(_record(step))
        now[0] += 0.05
    telemetry.on_eval(EvalRecord(step=3, epoch=0, accuracy=0.75))
    telemetry.on_traffic(5000, 20000)  # finish + download, outside the step loop
    telemetry.finish()
    got = samples(metrics.registry)
    assert got[("splitkd_edge_training_steps_total", ())] == 3
    assert got[("splitkd_edge_training_loss", ())] == pytest.approx(1.3)
    assert got[("splitkd_edge_training_accuracy", ())] == 0.75
    assert got[("splitkd_edge_sent_bytes_total", ())] == 8000
    assert got[("splitkd_edge_received_bytes_total", ())] == 21200
    phase = (("phase", "network"),)
    assert got[("splitkd_edge_step_duration_seconds_count", phase)] == 3
    assert got[("splitkd_edge_step_duration_seconds_sum", phase)] == pytest.approx(0.03)
    energy = {
        c: got[("splitkd_edge_energy_joules_total", (("component", c),))]
        for c in ("compute", "idle", "radio")
    }
    report = telemetry.report()
    for component, joules in energy.items():
        assert joules == pytest.approx(report["estimate_joules"][component])
    assert energy["compute"] == pytest.approx(3 * 0.003 * 5.0)  # Pi 4 active watts
    assert report["measured_joules"] is None  # no counter in an empty sysfs
    info = (("device_id", "pi-7"), ("device_profile", "raspberry-pi-4"), ("link_profile", "wifi"))
    assert got[("splitkd_edge_info", info)] == 1
    assert len(telemetry.cumulative_joules) == 3
    joules = list(telemetry.cumulative_joules.values())
    assert joules == sorted(joules) and list(telemetry.cumulative_joules) == [0, 1, 2]


def test_plots_are_written_beside_the_report(tmp_path: Path) -> None:
    from splitkd import plots

    history = [{**_record(i).__dict__, "energy_joules": float(i)} for i in range(30)]
    report = {
        "history": history,
        "evaluations": [{"step": 30, "epoch": 0, "accuracy": 0.8}],
        "student": {"accuracy": 0.82},
        "energy": {"device_profile": "raspberry-pi-4", "link_profile": "wifi"},
    }
    paths = plots.write_plots(tmp_path, {"edge-0": report, "edge-1": report}, prefix="run-")
    assert [p.name for p in paths] == [
        "run-loss_accuracy.png",
        "run-step_latency.png",
        "run-traffic_energy.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
