"""make compare's scenarios: the tiny and mixed fleets have the non-IID shards and the student
that a cohort gives their small devices; the summary reports each class of a mixed fleet."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.compare.report import summarise
from benchmarks.compare.scenarios import PI_4, PI_ZERO, SCENARIOS, RunContext, prepare
from benchmarks.compare.splitkd_systems import COHORT, _edge_command, cohort_file
from benchmarks.compare.systems import applies
from cloud_service.fleet.config import load_plans
from cloud_service.fleet.service import FleetService, FleetSettings
from splitkd.device_classes import STANDARD, TINY, student_for
from splitkd.hyper import Hyperparameters
from splitkd.messages import CohortConfig, RoundState
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from tests.support import DIGITS, make_service

TINY_FLEET = SCENARIOS["noniid-4-a0.3-tiny"]
MIXED_FLEET = SCENARIOS["noniid-4-a0.3-mixed"]
PLAIN_FLEET = SCENARIOS["noniid-4-a0.3"]


def _prepare(name: str, tmp_path: Path, seed: int = 1) -> RunContext:
    return prepare(SCENARIOS[name], seed, tmp_path / name, rounds=2, local_epochs=1)


def test_the_small_fleets_have_the_non_iid_fleets_shards_and_the_half_width_student(
    tmp_path: Path,
) -> None:
    plain = _prepare(PLAIN_FLEET.name, tmp_path)
    tiny, mixed = _prepare(TINY_FLEET.name, tmp_path), _prepare(MIXED_FLEET.name, tmp_path)
    assert [d.device_class for d in plain.devices] == [STANDARD] * 4
    assert [(d.profile, d.device_class) for d in tiny.devices] == [(PI_ZERO, TINY)] * 4
    assert [(d.profile, d.device_class) for d in mixed.devices] == [
        (PI_4, STANDARD),
        (PI_ZERO, TINY),
    ] * 2
    for ctx in (tiny, mixed):
        assert [d.shard for d in ctx.devices] == ["0/4", "1/4", "2/4", "3/4"]
        for mine, theirs in zip(ctx.devices, plain.devices, strict=True):
            assert (mine.train_samples, mine.heldout_samples) == (
                theirs.train_samples,
                theirs.heldout_samples,
            )
            with np.load(mine.path) as a, np.load(theirs.path) as b:
                for key in ("train_x", "train_y", "heldout_x", "heldout_y"):
                    np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(ctx.union_y, plain.union_y)
        # FedAvg's one model fits the smallest device: the tiny class's student.
        assert ctx.student == student_for(TINY, plain.student)
    assert tiny.student.widths == (4, 8) and plain.student.widths == (8, 16)


def test_the_cohort_gives_each_device_its_class_student_and_the_tiny_one_flowers_start(
    tmp_path: Path,
) -> None:
    ctx = _prepare(MIXED_FLEET.name, tmp_path)
    service = make_service(tmp_path, hyper=Hyperparameters(seed=ctx.seed, epochs=1))
    config = CohortConfig("federated", min_devices=4, rounds=1, local_epochs=1)
    fleet = FleetService(service, FleetSettings(config, {}))
    try:
        answers = [
            fleet.join(d.name, "compare", DIGITS, d.train_samples, profile=d.profile)
            for d in ctx.devices
        ]
        tasks = [fleet.fetch(answer.member_id, 0) for answer in answers]
    finally:
        fleet.close()
    # The Flower server builds its initial weights from the spec it is given as JSON.
    spec = ModelSpec.from_json(ctx.student.family, ctx.student.to_json())
    flower_start = zoo.build(spec, ctx.seed).state_dict()
    for data, answer, task in zip(ctx.devices, answers, tasks, strict=True):
        assert answer.device_class == data.device_class
        assert task.state is RoundState.TRAINING and task.round == 1
        if data.device_class == STANDARD:
            assert answer.model_name == "cohort-compare"
            assert answer.student_spec == zoo.default_student(DIGITS) != ctx.student
            continue
        assert answer.model_name == "cohort-compare-tiny" and answer.student_spec == ctx.student
        assert set(task.weights) == set(flower_start)
        for name, value in flower_start.items():
            np.testing.assert_array_equal(np.asarray(task.weights[name]), value.numpy())


def test_the_tiny_fleets_edges_give_their_profile_and_solo_split_kd_is_skipped(
    tmp_path: Path,
) -> None:
    tiny, plain = _prepare(TINY_FLEET.name, tmp_path), _prepare(PLAIN_FLEET.name, tmp_path)
    mixed = _prepare(MIXED_FLEET.name, tmp_path)
    command = _edge_command(tiny, tmp_path, tiny.devices[0], 1234)
    assert command[command.index("--device-profile") + 1] == PI_ZERO
    assert command[command.index("--dirichlet-alpha") + 1] == "0.3"
    command = _edge_command(mixed, tmp_path, mixed.devices[2], 1234)
    assert command[command.index("--device-profile") + 1] == PI_4
    assert command[command.index("--shard") + 1] == "2/4"
    assert "--device-profile" not in _edge_command(plain, tmp_path, plain.devices[0], 1234)
    assert not applies("splitkd-split-kd", tiny.scenario)
    assert not applies("splitkd-split-kd", mixed.scenario)
    assert applies("splitkd-split-kd", plain.scenario)
    assert applies("flower-fedavg", tiny.scenario)
    assert applies("splitkd-federated-cohort", tiny.scenario)


def _run(system: str, accuracies: list[float]) -> dict[str, object]:
    classes = [STANDARD, TINY, STANDARD, TINY]
    devices = [
        {"accuracy": a, "union_accuracy": a, "bytes_up": 10, "bytes_down": 20, "device_class": c}
        for a, c in zip(accuracies, classes, strict=True)
    ]
    return {"system": system, "scenario": "mixed", "seed": 0, "seconds": 1.0, "devices": devices}


def test_the_summary_of_a_mixed_fleet_has_a_row_per_class() -> None:
    rows = summarise([_run("koala", [1.0, 0.5, 0.8, 0.7]), _run("fedavg", [0.9] * 4)])
    by = {(r["system"], r["scenario"]): r["accuracy"] for r in rows}
    assert by[("koala", "mixed")] == 0.75
    assert by[("koala", "mixed [standard]")] == 0.9
    assert by[("koala", "mixed [tiny]")] == 0.6
    assert len(rows) == 6
    # A fleet of one class (or an old report without classes) has its one row.
    old = _run("fedavg", [0.9] * 4)
    for device in old["devices"]:  # type: ignore[attr-defined]
        del device["device_class"]
    assert [r["scenario"] for r in summarise([old])] == ["mixed"]


def test_the_ablation_gives_the_federated_cohort_plain_fedavg(tmp_path: Path) -> None:
    defaults = CohortConfig("federated")
    assert load_plans(None, defaults).get(COHORT) is None  # by default: KOALA
    plans = load_plans(cohort_file(tmp_path / "fedavg.toml", "fedavg"), defaults)
    assert plans[COHORT].strategy_name == "fedavg"
    assert plans[COHORT].config.mode == "federated"
