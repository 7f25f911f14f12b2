"""make compare's scenarios: the tiny fleet has the non-IID shards and the tiny class's student."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.compare.scenarios import SCENARIOS, RunContext, prepare
from benchmarks.compare.splitkd_systems import _edge_command
from benchmarks.compare.systems import applies
from cloud_service.fleet.service import FleetService, FleetSettings
from splitkd.device_classes import TINY, student_for
from splitkd.hyper import Hyperparameters
from splitkd.messages import CohortConfig, RoundState
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from tests.support import DIGITS, make_service

TINY_FLEET = SCENARIOS["noniid-4-a0.3-tiny"]
PLAIN_FLEET = SCENARIOS["noniid-4-a0.3"]


def _prepare(name: str, tmp_path: Path, seed: int = 1) -> RunContext:
    return prepare(SCENARIOS[name], seed, tmp_path / name, rounds=2, local_epochs=1)


def test_the_tiny_fleet_has_the_non_iid_fleets_shards_and_the_half_width_student(
    tmp_path: Path,
) -> None:
    tiny, plain = _prepare(TINY_FLEET.name, tmp_path), _prepare(PLAIN_FLEET.name, tmp_path)
    assert TINY_FLEET.device_class == TINY and PLAIN_FLEET.device_class == "standard"
    assert [d.shard for d in tiny.devices] == ["0/4", "1/4", "2/4", "3/4"]
    for mine, theirs in zip(tiny.devices, plain.devices, strict=True):
        assert (mine.train_samples, mine.heldout_samples) == (
            theirs.train_samples,
            theirs.heldout_samples,
        )
        with np.load(mine.path) as a, np.load(theirs.path) as b:
            for key in ("train_x", "train_y", "heldout_x", "heldout_y"):
                np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(tiny.union_y, plain.union_y)
    # Every system of the tiny fleet trains the tiny class's student, not the plain one.
    assert tiny.student == student_for(TINY, plain.student)
    assert tiny.student.widths == (4, 8) and plain.student.widths == (8, 16)


def test_the_cohort_gives_a_tiny_device_the_student_and_weights_flower_starts_from(
    tmp_path: Path,
) -> None:
    ctx = _prepare(TINY_FLEET.name, tmp_path)
    service = make_service(tmp_path, hyper=Hyperparameters(seed=ctx.seed, epochs=1))
    config = CohortConfig("federated", min_devices=1, rounds=1, local_epochs=1)
    fleet = FleetService(service, FleetSettings(config, {}))
    try:
        answer = fleet.join("edge-0", "compare", DIGITS, 100, profile=TINY_FLEET.device_profile)
        task = fleet.fetch(answer.member_id, 0)
    finally:
        fleet.close()
    assert answer.device_class == TINY and answer.model_name == "cohort-compare-tiny"
    assert answer.student_spec == ctx.student
    assert task.state is RoundState.TRAINING and task.round == 1
    # The Flower server builds its initial weights from the spec it is given as JSON.
    spec = ModelSpec.from_json(ctx.student.family, ctx.student.to_json())
    flower_start = zoo.build(spec, ctx.seed).state_dict()
    assert set(task.weights) == set(flower_start)
    for name, value in flower_start.items():
        np.testing.assert_array_equal(np.asarray(task.weights[name]), value.numpy())


def test_the_tiny_fleets_edges_give_their_profile_and_solo_split_kd_is_skipped(
    tmp_path: Path,
) -> None:
    tiny, plain = _prepare(TINY_FLEET.name, tmp_path), _prepare(PLAIN_FLEET.name, tmp_path)
    command = _edge_command(tiny, tmp_path, "edge-0", "0/4", 1234)
    at = command.index("--device-profile")
    assert command[at + 1] == "raspberry-pi-zero-2w"
    assert command[command.index("--dirichlet-alpha") + 1] == "0.3"
    assert "--device-profile" not in _edge_command(plain, tmp_path, "edge-0", "0/4", 1234)
    assert not applies("splitkd-split-kd", tiny.scenario)
    assert applies("splitkd-split-kd", plain.scenario)
    assert applies("flower-fedavg", tiny.scenario)
    assert applies("splitkd-federated-cohort", tiny.scenario)
