"""The planner (edge_agent/plan*.py) and pipelined steps (edge_agent/pipeline.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_service import pipeline as cloud_pipeline
from cloud_service.server import build_grpc_server
from edge_agent.cli import main
from edge_agent.plan_model import (
    Candidate,
    DeviceFigures,
    LinkFigures,
    Stage,
    Workload,
    choose,
    predict,
    step_kinds,
)
from splitkd import energy
from splitkd.errors import FailedPrecondition
from splitkd.hyper import Hyperparameters
from splitkd.messages import SessionAsk
from splitkd.models import zoo
from tests.support import DIGITS, LiveCloud, make_service, make_teacher

STUDENT = zoo.default_student(DIGITS)
TEACHER = zoo.default_teacher(DIGITS)
PROFILE = (energy.device_profile("raspberry-pi-4"), energy.link_profile("lte"))


def _stage(shape: tuple[int, ...], seconds: float = 0.0) -> Stage:
    return Stage(seconds, seconds, shape, seconds, 1000, {"w": np.zeros(10, np.float32)})


def fake_device(wire: dict[str, float] | None = None, seconds: float = 0.0) -> DeviceFigures:
    costs = wire or {}
    return DeviceFigures(
        batch_size=32,
        student={1: _stage((8, 4, 4), seconds), 2: _stage((16, 2, 2), seconds)},
        teacher={1: _stage((32, 4, 4), seconds)},
        whole_student=_stage((10,), seconds),
        wire_seconds={
            (cut, name): costs.get(name, 0.0)
            for cut in (1, 2)
            for name in costs or ["float32", "float16", "int8", "topk"]
        },
        onnx_bytes=9000,
        student_state={"w": np.zeros(2000, np.float32)},
    )


def workload(epochs: int = 3, cache: int = 10_000, samples: int = 100) -> Workload:
    return Workload(
        train_samples=samples,
        heldout_samples=40,
        hyper=Hyperparameters(epochs=epochs, batch_size=32),
        student_spec=STUDENT,
        teacher_spec=TEACHER,
        teacher_cut=1,
        cache_samples=cache,
    )


def test_each_sample_s_teacher_side_travels_once_with_the_cache_and_every_epoch_without() -> None:
    cached = step_kinds(workload(epochs=3))
    assert len(cached) == 3 * 4  # 100 samples in batches of 32: 4 steps an epoch
    assert sum(k.teacher + k.ahead for k in cached) == 100
    assert sum(k.batch for k in cached if k.fresh) == 100  # labels once per sample
    assert all(k.ids for k in cached)
    uncached = step_kinds(workload(epochs=3, cache=0))
    assert sum(k.teacher + k.ahead for k in uncached) == 300
    assert all(k.fresh and not k.ids for k in uncached)


def test_seconds_are_round_trips_times_rtt_when_nothing_else_costs() -> None:
    link = LinkFigures(rtt=0.1, up_bytes_per_second=1e18, down_bytes_per_second=1e18)
    load = workload(epochs=3)
    got = predict(Candidate("split", 1, 1, "float32"), load, fake_device(), link, PROFILE)
    # 12 steps and, after each of 3 epochs, one evaluation call (40 held-out samples).
    assert got.seconds == pytest.approx((12 + 3) * 0.1)
    assert got.step_calls == 12
    # No compute: the device only waits (idle watts) and the radio works.
    assert got.joules >= PROFILE[0].idle_watts * got.seconds


def test_bytes_follow_the_codec_and_the_cut() -> None:
    link = LinkFigures(rtt=0.05, up_bytes_per_second=1e6, down_bytes_per_second=1e6)
    load, device = workload(), fake_device()
    sizes = {
        (cut, name): predict(Candidate("split", cut, 1, name), load, device, link, PROFILE).bytes
        for cut in (1, 2)
        for name in ("float32", "float16", "int8", "topk")
    }
    for cut in (1, 2):
        assert sizes[cut, "int8"] < sizes[cut, "float16"] < sizes[cut, "float32"]
        assert sizes[cut, "topk"] < sizes[cut, "float32"]
    assert sizes[2, "float32"] < sizes[1, "float32"]  # 64 values a sample instead of 128
    federated = predict(Candidate("federated"), load, device, link, PROFILE)
    weights = 2000 * 4
    rounds = 2  # 3 epochs, 2 local epochs a round
    assert rounds * 2 * weights < federated.bytes < rounds * 2 * (weights + 1000) + 10_000


def test_a_slow_link_picks_a_smaller_codec_than_a_fast_one() -> None:
    # int8 costs CPU to pack; on a fast link that is all that differs.
    device = fake_device({"float32": 0.0, "float16": 0.002, "int8": 0.004, "topk": 0.01})
    load = workload()
    fast = LinkFigures(rtt=0.0005, up_bytes_per_second=1e9, down_bytes_per_second=1e9)
    slow = LinkFigures(rtt=0.07, up_bytes_per_second=2e5, down_bytes_per_second=4e5)
    choices = {}
    for name, link in (("fast", fast), ("slow", slow)):
        predictions = [
            (c, predict(c, load, device, link, PROFILE))
            for c in (Candidate("split", 1, 1, n) for n in ("float32", "float16", "int8", "topk"))
        ]
        choices[name] = choose(predictions, "time")[0].wire_codec
    assert choices == {"fast": "float32", "slow": "int8"}


def test_a_lossier_codec_must_save_more_than_the_margin() -> None:
    link = LinkFigures(rtt=0.05, up_bytes_per_second=1e9, down_bytes_per_second=1e9)
    load, device = workload(), fake_device()
    predictions = [
        (c, predict(c, load, device, link, PROFILE))
        for c in (Candidate("split", 1, 1, "float32"), Candidate("split", 1, 1, "int8"))
    ]
    # On this link bytes barely matter for time: float32 stays.
    assert choose(predictions, "time")[0].wire_codec == "float32"
    assert choose(predictions, "bytes")[0].wire_codec == "int8"


# -- the CLI against a live cloud ---------------------------------------------------


def _plan(address: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = main(
        [
            "plan",
            "--cloud",
            address,
            "--data",
            "digits",
            "--shard",
            "0/2",
            "--device-id",
            "p0",
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_lists_candidates_and_the_choice_for_the_objective(
    live_cloud: LiveCloud, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _plan(live_cloud.address, capsys, "--json", "--objective", "bytes")
    assert code == 0, err
    plan = json.loads(out)
    names = {c["name"] for c in plan["candidates"]}
    assert "federated" in names
    assert {
        f"split cut {cut}/1 {codec}" for cut in (1, 2) for codec in ("float32", "int8")
    } <= names
    for entry in (*plan["candidates"], plan["choice"], plan["choice_alone"]):
        predicted = entry["predicted"]
        assert predicted["seconds"] > 0 and predicted["joules"] > 0 and predicted["bytes"] > 0
    fewest = min(c["predicted"]["bytes"] for c in plan["candidates"])
    assert plan["choice"]["predicted"]["bytes"] <= fewest * 1.02
    assert plan["choice_alone"]["mode"] == "split"
    assert plan["link"]["rtt_ms"] > 0 and plan["link"]["up_mbps"] > 0


def test_plan_refuses_an_unreachable_cloud_and_an_unknown_objective_in_one_line(
    live_cloud: LiveCloud, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _plan("127.0.0.1:1", capsys, "--timeout", "1")
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "cannot reach the cloud" in err
    code, out, err = _plan(live_cloud.address, capsys, "--objective", "speed")
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--objective" in err


def _train(address: str, tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    folder = tmp_path / name
    code = main(
        [
            "train",
            "--cloud", address, "--data", "digits", "--shard", "0/2",
            "--device-id", name,
            "--report", str(folder / "report.json"),
            "--model-dir", str(folder / "models"),
            "--checkpoint-dir", str(folder / "checkpoints"),
            "--no-progress", "--no-plots",
            *extra,
        ]
    )  # fmt: skip
    assert code == 0
    report: dict[str, Any] = json.loads((folder / "report.json").read_text())
    return report


def test_train_plan_auto_trains_with_the_choice_and_records_predicted_and_measured(
    live_cloud: LiveCloud, tmp_path: Path
) -> None:
    report = _train(live_cloud.address, tmp_path, "auto", "--plan", "auto", "--objective", "bytes")
    plan = report["plan"]
    choice = plan["choice"]
    assert choice["mode"] == "split"
    assert report["session"]["student_cut"] == choice["student_cut"]
    assert report["session"]["hyperparameters"]["wire_codec"] == choice["wire_codec"]
    for key in ("seconds", "joules", "bytes"):
        assert plan["predicted"][key] > 0 and plan["measured"][key] > 0
    # The byte model is built from real messages: it must hold closely.
    assert plan["ratio"]["bytes"] == pytest.approx(1.0, abs=0.10)


# -- pipelining ---------------------------------------------------------------------


@pytest.fixture
def longer_cloud(tmp_path: Path) -> Any:
    service = make_service(
        tmp_path / "cloud", hyper=Hyperparameters(epochs=4, batch_size=32), teacher=make_teacher()
    )
    server, port = build_grpc_server(service, "127.0.0.1:0", max_message_bytes=4 * 1024 * 1024)
    server.start()
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_pipelined_steps_train_as_well_and_stay_within_the_window(
    longer_cloud: Any, tmp_path: Path
) -> None:
    _, address = longer_cloud
    one = _train(address, tmp_path, "depth1")
    three = _train(address, tmp_path, "depth3", "--pipeline-depth", "3")
    assert three["pipeline"] == {"depth": 3, "most_in_flight": 3}
    assert three["steps"] == one["steps"] and len(three["history"]) == one["steps"]
    assert three["faults"]["resumes"] == 0  # no step was refused as out of order
    # Stale by at most two steps, the head learns about as well (108 held-out samples).
    assert three["student"]["accuracy"] >= one["student"]["accuracy"] - 0.1
    assert three["history"][-1]["loss"] < three["history"][0]["loss"]


def test_pipeline_depth_out_of_range_is_one_line(
    live_cloud: LiveCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bad"
    code = main(
        ["train", "--cloud", live_cloud.address, "--data", "digits", "--device-id", "bad",
         "--report", str(folder / "r.json"), "--model-dir", str(folder / "m"),
         "--checkpoint-dir", str(folder / "c"), "--no-progress", "--pipeline-depth", "9"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "--pipeline-depth" in err and len(err.strip().splitlines()) == 1


def test_the_cloud_lets_an_early_step_wait_for_its_turn_and_refuses_one_far_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = threading.Event()
    original = cloud_pipeline.wait_turn

    def spy(session: Any, number: int) -> None:
        if number > session.next_step:
            waiting.set()
        original(session, number)

    monkeypatch.setattr(cloud_pipeline, "wait_turn", spy)
    service = make_service(tmp_path)
    session = service.register("early", DIGITS, ask=SessionAsk(pipeline_depth=4))
    rng = np.random.default_rng(0)

    def step(number: int) -> Any:
        return service.step(
            session.session_id,
            number,
            rng.standard_normal((4, *session.student_activation_shape)).astype(np.float32),
            rng.standard_normal((4, *session.teacher_activation_shape)).astype(np.float32),
            rng.integers(0, 10, 4),
        )

    with pytest.raises(FailedPrecondition, match="out of order"):
        step(cloud_pipeline.MAX_AHEAD + 1)
    unpipelined = service.register("early-2", DIGITS)
    with pytest.raises(FailedPrecondition, match="out of order"):  # at once: it did not ask
        service.step(
            unpipelined.session_id,
            1,
            np.zeros((4, *session.student_activation_shape), np.float32),
            np.zeros((4, *session.teacher_activation_shape), np.float32),
            np.zeros(4, np.int64),
        )
    waiting.clear()  # the refused call above went through the spy too
    results: list[Any] = []
    early = threading.Thread(target=lambda: results.append(step(1)))
    early.start()
    assert waiting.wait(60)  # step 1 is at the cloud before step 0
    first = step(0)
    early.join(timeout=60)
    assert first.step == 0 and [r.step for r in results] == [1]
    assert session.next_step == 2
