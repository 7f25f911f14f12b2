"""Fleets: the cohort state machine, strategies, config, and both modes over real gRPC."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from cloud_service.fleet.cohort import Cohort, Pending
from cloud_service.fleet.config import load_plans
from cloud_service.fleet.service import FleetService, FleetSettings
from cloud_service.fleet.strategy import Contribution, FedAvg, Koala
from cloud_service.publish import publish_teacher
from cloud_service.server import build_grpc_server
from cloud_service.service import CloudService
from cloud_service.teacher import TeacherVersions
from edge_agent.client import CloudClient, Traffic
from edge_agent.errors import CloudRefused
from edge_agent.fleet import install_final, run_rounds
from edge_agent.model_store import ModelStore
from edge_agent.telemetry import TrainingTelemetry
from splitkd import codec, koala
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import Shard, cloud_split
from splitkd.data.specs import Dataset
from splitkd.errors import FailedPrecondition, InvalidArgument
from splitkd.hyper import Hyperparameters
from splitkd.messages import CohortConfig, JoinAnswer, RoundState, RoundTask
from splitkd.models import zoo
from splitkd.models.normalize import fit_inputs, fit_stats
from splitkd.models.staged import StagedModel
from splitkd.training import predict
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, make_service, make_teacher


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cohort(clock: Clock, **config: object) -> Cohort:
    spec = zoo.default_student(DIGITS)
    weights = koala.weights_of(zoo.build(spec, 1))
    return Cohort("k", CohortConfig(**config), {"standard": spec}, {"standard": weights}, clock)  # type: ignore[arg-type]


def _pending(cohort: Cohort, member_id: str, samples: int = 10) -> Pending:
    weights = cohort.students["standard"]
    return Pending(Contribution(member_id, "standard", weights, samples), 0.5)


def test_round_one_opens_when_enough_devices_joined() -> None:
    cohort = _cohort(Clock(), min_devices=2)
    a = cohort.join("a", "standard", 10)
    assert cohort.round == 0 and cohort.task_state(a, 0) is RoundState.WAITING
    b = cohort.join("b", "standard", 10)
    assert cohort.round == 1
    assert cohort.task_state(a, 0) is RoundState.TRAINING
    assert cohort.join("b", "standard", 12).member_id == b.member_id  # rejoin keeps the member


def test_round_closes_when_all_delivered_and_refuses_stale_and_counts_duplicates_once() -> None:
    cohort = _cohort(Clock(), min_devices=2, rounds=3)
    a, b = cohort.join("a", "standard", 10), cohort.join("b", "standard", 10)
    assert cohort.accept(a, 1, _pending(cohort, a.member_id))
    assert not cohort.accept(a, 1, _pending(cohort, a.member_id))  # duplicate: taken once
    assert not cohort.ready_to_close()
    assert cohort.accept(b, 1, _pending(cohort, b.member_id))
    assert cohort.ready_to_close()
    pending = cohort.begin_close()
    with pytest.raises(FailedPrecondition, match="closing"):
        cohort.accept(a, 1, _pending(cohort, a.member_id))
    outcome = FedAvg().aggregate(
        1, cohort.students, cohort.specs, [p.contribution for p in pending]
    )
    cohort.end_close(outcome, {"standard": 1}, pending)
    assert cohort.round == 2 and len(cohort.history) == 1
    with pytest.raises(FailedPrecondition, match=r"round 1 .* is closed"):
        cohort.accept(a, 1, _pending(cohort, a.member_id))


def test_a_straggler_never_stalls_the_fleet() -> None:
    clock = Clock()
    cohort = _cohort(clock, min_devices=2, rounds=5, round_timeout_seconds=30)
    a, b = cohort.join("a", "standard", 10), cohort.join("dead", "standard", 10)
    cohort.accept(a, 1, _pending(cohort, a.member_id))
    assert not cohort.ready_to_close()
    clock.now = 31.0  # the deadline passes with one update: the round closes with it
    assert cohort.ready_to_close()
    pending = cohort.begin_close()
    cohort.end_close(
        FedAvg().aggregate(1, cohort.students, cohort.specs, [p.contribution for p in pending]),
        {},
        pending,
    )
    assert cohort.members[b.member_id].missed == 1
    # Round 2: the dead device no longer holds the round up.
    cohort.accept(a, 2, _pending(cohort, a.member_id))
    assert cohort.ready_to_close()


class _LateDevice:
    """A client whose first update arrives after its round closed: the real cohort's answer."""

    def __init__(self, cohort: Cohort, member_id: str) -> None:
        self.cohort, self.member_id = cohort, member_id
        self.traffic = Traffic()
        self.fetched: list[int] = []
        self.submitted: list[int] = []

    def fetch_round(self, member_id: str, after: int, *_: object) -> object:
        self.fetched.append(after)
        if after >= 2:
            return RoundTask(RoundState.COMPLETE, after)
        return RoundTask(RoundState.TRAINING, after + 1, dict(self.cohort.students["standard"]))

    def submit_update(self, update: object) -> object:
        round_number = update.round  # type: ignore[attr-defined]
        self.submitted.append(round_number)
        member = self.cohort.members[self.member_id]
        try:
            self.cohort.accept(member, round_number, _pending(self.cohort, self.member_id))
        except FailedPrecondition as exc:
            raise CloudRefused("SubmitUpdate", "FAILED_PRECONDITION", str(exc)) from exc
        return type("Answer", (), {"duplicate": False})()


def test_a_straggler_whose_round_closed_goes_on_with_the_next_round() -> None:
    cohort = _cohort(Clock(), min_devices=1, rounds=3)
    member = cohort.join("late", "standard", 10)
    cohort.round = 2  # round 1 closed at its deadline without this device
    config = CohortConfig("federated", rounds=3, local_epochs=1)
    join = JoinAnswer(
        member.member_id,
        "k",
        "standard",
        config,
        cohort.specs["standard"],
        Hyperparameters(seed=0, epochs=1),
        "cohort-k",
        1,
        1,
    )
    split = edge_split(load_dataset("digits"), Shard(0, 8), presumed_fraction=0.4)
    client = _LateDevice(cohort, member.member_id)
    run = run_rounds(client, join, split, TrainingTelemetry("laptop-x86", "wifi"))  # type: ignore[arg-type]
    # Round 1 was refused as closed; the device fetched on after it and delivered round 2.
    assert client.submitted == [1, 2] and client.fetched == [0, 1, 2]
    assert [r.round for r in run.rounds] == [2]
    assert member.member_id in cohort.pending


def test_a_round_nobody_delivered_is_extended_not_closed_empty() -> None:
    clock = Clock()
    cohort = _cohort(clock, min_devices=1, round_timeout_seconds=10)
    cohort.join("a", "standard", 10)
    clock.now = 11.0
    assert not cohort.ready_to_close()
    assert cohort.deadline == pytest.approx(21.0)


def test_fedavg_weights_by_samples() -> None:
    one = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    three = {"w": np.array([3.0, 5.0], dtype=np.float32)}
    avg = koala.fedavg([(one, 1), (three, 3)])
    np.testing.assert_allclose(avg["w"], [2.5, 4.0])


def test_cohort_config_file(tmp_path: Path) -> None:
    path = tmp_path / "cohorts.toml"
    path.write_text(
        '[cohorts.kitchen]\nmode = "split"\nrounds = 4\nround_timeout = 9\n'
        "[cohorts.kitchen.classes.tiny]\nwidths = [2, 4]\n"
    )
    plans = load_plans(path, CohortConfig(rounds=10))
    kitchen = plans["kitchen"]
    assert kitchen.config.mode == "split" and kitchen.config.rounds == 4
    assert kitchen.config.round_timeout_seconds == 9.0 and kitchen.strategy_name == "fedavg"
    assert kitchen.classes["tiny"].widths == (2, 4)
    path.write_text("[cohorts.kitchen]\nrounds = 0\n")
    with pytest.raises(InvalidArgument, match="rounds must be in"):
        load_plans(path, CohortConfig())
    path.write_text("[cohorts.kitchen]\nshell = 'rm -rf /'\n")
    with pytest.raises(InvalidArgument, match="unknown keys"):
        load_plans(path, CohortConfig())
    path.write_text("not toml [")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load_plans(path, CohortConfig())


@dataclass
class LiveFleet:
    service: CloudService
    fleet: FleetService
    address: str
    stub: pb_grpc.FleetStub


def _live_fleet(tmp_path: Path, config: CohortConfig, proxy: bool = True) -> Iterator[LiveFleet]:
    service = make_service(tmp_path)
    dataset = load_dataset("digits")
    presumed = cloud_split(dataset, 0.4)
    labels = koala.CloudLabels(presumed.train, presumed.heldout) if proxy else None
    fleet = FleetService(
        service,
        FleetSettings(
            config, {}, None if labels is None else labels.train.x, labels, tmp_path / "cohorts"
        ),
    )
    publish_teacher(service)
    service.teachers.on_update.append(lambda _t: publish_teacher(service))
    server, port = build_grpc_server(service, "127.0.0.1:0", fleet=fleet)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield LiveFleet(service, fleet, f"127.0.0.1:{port}", pb_grpc.FleetStub(channel))  # type: ignore[no-untyped-call]
    finally:
        channel.close()
        server.stop(0)
        fleet.close()


@pytest.fixture
def federated(tmp_path: Path) -> Iterator[LiveFleet]:
    config = CohortConfig(
        "federated", min_devices=2, rounds=2, local_epochs=1, round_timeout_seconds=60
    )
    yield from _live_fleet(tmp_path, config)


@pytest.fixture
def split_mode(tmp_path: Path) -> Iterator[LiveFleet]:
    config = CohortConfig(
        "split", min_devices=2, rounds=2, local_epochs=1, round_timeout_seconds=60
    )
    yield from _live_fleet(tmp_path, config, proxy=False)


def _devices(live: LiveFleet, tmp_path: Path, profiles: list[str]) -> dict[int, dict[str, object]]:
    dataset = load_dataset("digits")
    results: dict[int, dict[str, object]] = {}
    errors: list[BaseException] = []

    def device(i: int) -> None:
        try:
            split = edge_split(dataset, Shard(i, len(profiles)), alpha=0.3, presumed_fraction=0.4)
            with CloudClient(live.address) as client:
                join = client.join_cohort(
                    f"edge-{i}",
                    "kitchen",
                    dataset.signature,
                    len(split.train),
                    device_profile=profiles[i],
                )
                run = run_rounds(client, join, split, TrainingTelemetry(profiles[i], "wifi"))
                local, predictor = install_final(
                    client, run, ModelStore(tmp_path / f"models-{i}"), dataset.signature.input_shape
                )
                results[i] = {
                    "class": join.device_class,
                    "rounds": run.rounds,
                    "model": local.name,
                    "accuracy": predictor.accuracy(split.heldout.x, split.heldout.y),
                    "bytes": client.traffic.bytes_up + client.traffic.bytes_down,
                }
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(len(profiles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    return results


@pytest.mark.slow
def test_federated_cohort_heterogeneous_classes_and_server_model_versions(
    federated: LiveFleet, tmp_path: Path
) -> None:
    results = _devices(federated, tmp_path, ["raspberry-pi-4", "raspberry-pi-zero-2w"])
    assert {r["class"] for r in results.values()} == {"standard", "tiny"}
    assert {r["model"] for r in results.values()} == {"cohort-kitchen", "cohort-kitchen-tiny"}
    for r in results.values():
        assert [f.round for f in r["rounds"]] == [1, 2]  # type: ignore[attr-defined]
        assert float(r["accuracy"]) > 0.3  # chance is 0.1 (an untrained teacher here)  # type: ignore[arg-type]
    # Two rounds of KOALA: the server model learnt twice, each version published.
    assert federated.service.teachers.current().version == 3
    assert [r.teacher_version for r in federated.service.registry.versions("teacher")] == [1, 2, 3]
    summary = federated.fleet.describe("kitchen")
    assert summary["complete"] is True and summary["server_model_version"] == 3
    assert len(summary["rounds"]) == 2  # type: ignore[arg-type]


@pytest.mark.slow
def test_split_cohort_trains_through_the_split(split_mode: LiveFleet, tmp_path: Path) -> None:
    results = _devices(split_mode, tmp_path, ["raspberry-pi-4", "raspberry-pi-5"])
    for r in results.values():
        assert r["model"] == "cohort-kitchen"
        assert all(f.steps > 0 for f in r["rounds"])  # type: ignore[attr-defined]
        assert float(r["accuracy"]) > 0.3  # chance is 0.1 (an untrained teacher here)  # type: ignore[arg-type]
    # Split rounds move activations: far more bytes than federated weights would.
    assert all(int(r["bytes"]) > 1_000_000 for r in results.values())  # type: ignore[call-overload]
    assert split_mode.service.sessions.active() == 0  # round sessions are gone once submitted


def _join(stub: pb_grpc.FleetStub, device: str, **fields: object) -> pb.JoinCohortResponse:
    request = pb.JoinCohortRequest(
        device_id=device,
        cohort=str(fields.get("cohort", "kitchen")),
        signature=pb.DatasetSignature(
            input_shape=list(fields.get("shape", [1, 8, 8])), num_classes=10
        ),  # type: ignore[call-overload]
        num_samples=int(fields.get("samples", 100)),  # type: ignore[call-overload]
        profile=pb.DeviceProfile(name=str(fields.get("profile", ""))),
    )
    reply: pb.JoinCohortResponse = stub.JoinCohort(request)
    return reply


def _status(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return, attr-defined]


def test_bad_joins_get_clear_statuses(federated: LiveFleet) -> None:
    stub = federated.stub
    assert _status(lambda: _join(stub, "a", shape=[3, 8, 8])) == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        _status(lambda: _join(stub, "a", profile="toaster")) == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert _status(lambda: _join(stub, "a", cohort="../etc")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _status(lambda: _join(stub, "a", samples=0)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _join(stub, "a").device_class == "standard"  # the cohort goes on


def test_bad_updates_are_refused_without_touching_the_aggregate(federated: LiveFleet) -> None:
    stub = federated.stub
    member = _join(stub, "a").member_id
    _join(stub, "b")
    task = stub.FetchRound(pb.FetchRoundRequest(member_id=member))
    assert task.state == pb.ROUND_STATE_TRAINING and task.round == 1
    good = codec.decode_weights(task.weights)
    cohort = federated.fleet._cohorts["kitchen"]
    before = {k: v.copy() for k, v in cohort.students["standard"].items()}

    def submit(weights: dict[str, np.ndarray], round_number: int = 1) -> object:
        return stub.SubmitUpdate(
            pb.SubmitUpdateRequest(
                member_id=member,
                round=round_number,
                weights=codec.encode_weights(weights),
                num_samples=50,
            )
        )

    renamed = {("x" + k): v for k, v in good.items()}
    reshaped = {k: np.zeros((2, *v.shape), np.float32) for k, v in good.items()}
    poisoned = {k: np.full(v.shape, np.nan, np.float32) for k, v in good.items()}
    for bad in (renamed, reshaped, poisoned):
        assert _status(lambda bad=bad: submit(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _status(lambda: submit(good, round_number=7)) == grpc.StatusCode.FAILED_PRECONDITION
    with cohort.lock:
        assert not cohort.pending
    for name, value in before.items():
        np.testing.assert_array_equal(cohort.students["standard"][name], value)
    assert (
        _status(lambda: stub.FetchRound(pb.FetchRoundRequest(member_id="f" * 32)))
        == grpc.StatusCode.NOT_FOUND
    )


def test_a_restarted_cloud_resumes_its_cohort_without_applying_anything_twice(
    tmp_path: Path,
) -> None:
    config = CohortConfig(
        "federated", min_devices=2, rounds=3, local_epochs=1, round_timeout_seconds=60
    )
    service = make_service(tmp_path)
    settings = FleetSettings(config, {}, None, None, tmp_path / "cohorts")
    fleet = FleetService(service, settings)
    dataset = load_dataset("digits")
    a = fleet.join("a", "k", dataset.signature, 10)
    fleet.join("b", "k", dataset.signature, 10)
    task = fleet.fetch(a.member_id, 0)
    from splitkd.messages import Update

    fresh, _ = fleet.submit(Update(a.member_id, 1, task.weights, 10, 0.5))
    assert fresh
    fleet.close()
    # A new process over the same state: round 1 still open, a's update still counted once.
    again = FleetService(make_service(tmp_path), settings)
    cohort = again._cohorts["k"]
    assert cohort.round == 1 and list(cohort.pending) == [a.member_id]
    fresh, _ = again.submit(Update(a.member_id, 1, task.weights, 10, 0.5))
    assert not fresh  # the retry after the restart is a duplicate
    again.close()


@pytest.mark.slow
def test_an_accepted_knowledge_report_redistils_a_finished_cohort(
    federated: LiveFleet, tmp_path: Path
) -> None:
    """DiReDi for a fleet: a member's report updates the teacher, and the cohort's students
    (one per device class) are re-distilled from it, each a new version of its model."""
    from cloud_service.lifecycle import Lifecycle, LifecycleSettings, StudentWeights
    from splitkd import rediredi
    from splitkd.errors import NotFound

    fast = rediredi.LoopSettings(
        distil_epochs=1, adapt_epochs=1, teacher_epochs=1, probes_per_shift=5
    )
    lifecycle = Lifecycle(
        federated.service,
        cloud_split(load_dataset("digits"), 0.4),
        StudentWeights(tmp_path / "weights"),
        LifecycleSettings(1.0, fast),
    )
    with pytest.raises(NotFound):
        lifecycle.cohort_students("edge-0", "kitchen")  # no such cohort yet
    _devices(federated, tmp_path, ["raspberry-pi-4", "raspberry-pi-zero-2w"])
    with pytest.raises(NotFound):
        lifecycle.cohort_students("edge-9", "kitchen")  # not a member
    students = lifecycle.cohort_students("edge-0", "kitchen")
    assert {s.model_name for s in students} == {"cohort-kitchen", "cohort-kitchen-tiny"}
    before = {s.model_name: federated.service.registry.get(s.model_name).version for s in students}
    base = lifecycle.distil("base")
    task = lifecycle.open("edge-0", "base", base.version, base.sha256)
    logits = np.eye(10, dtype=np.float32)[np.arange(len(task.probes)) % 10] * 5
    outcome = lifecycle.report(task, logits, 50, students)
    assert outcome.accepted and outcome.teacher_after == outcome.teacher_before + 1
    assert {(r.name, r.version) for r in outcome.cohort_students} == {
        (name, version + 1) for name, version in before.items()
    }
    for record in outcome.cohort_students:
        assert record.teacher_version == outcome.teacher_after


def test_a_cohorts_first_student_scales_inputs_by_the_clouds_proxy(tmp_path: Path) -> None:
    """Every device starts from one input scaling (the proxy's), not its own skewed one."""
    config = CohortConfig("federated", min_devices=2, rounds=1, local_epochs=1)
    proxy = cloud_split(load_dataset("digits"), 0.4).train.x
    means = {}
    for with_proxy in (True, False):
        live = _live_fleet(tmp_path / str(with_proxy), config, proxy=with_proxy)
        fleet = next(live).fleet
        try:
            fleet.join("edge-0", "kitchen", DIGITS, 100, "raspberry-pi-4")
            student = fleet._cohort("kitchen").students["standard"]
        finally:
            live.close()
        (key,) = [k for k in student if k.endswith("input_mean")]
        means[with_proxy] = student[key].reshape(-1)
    expected = fit_stats(proxy)[0].reshape(-1)
    assert expected.any()
    np.testing.assert_allclose(means[True], expected, rtol=1e-5)
    assert not means[False].any()  # no proxy: the device fits its own, as before


def _labels_the_server_gets_right(server: StagedModel) -> koala.CloudLabels:
    x = load_dataset("digits").x[:60]
    y = predict(server, x).argmax(axis=1).astype(np.int64)
    return koala.CloudLabels(Dataset(x, y, DIGITS), Dataset(x, y, DIGITS))


def test_a_server_model_the_fleet_made_worse_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With held-out labels of its own, the cloud keeps its server model when reverse KD
    made it less accurate there, and teaches the round's students from the one it has."""
    teachers = TeacherVersions(make_teacher(), tmp_path / "versions")
    server = teachers.current().model
    labels = _labels_the_server_gets_right(server)
    spec = zoo.default_student(DIGITS)
    students = {"standard": koala.weights_of(zoo.build(spec, 1))}
    updates = [Contribution("m", "standard", students["standard"], 10)]
    proxy = labels.train.x

    wrong = (int(np.bincount(labels.heldout.y).argmax()) + 1) % 10  # a class it rarely says

    def one_class(*_args: object, **_kwargs: object) -> StagedModel:
        # Reverse KD stands in: a copy of the server model that answers one class only.
        worse = copy.deepcopy(server)
        last = [p for p in worse.parameters() if p.dim() == 1][-1]
        with torch.no_grad():
            last.add_(torch.nn.functional.one_hot(torch.tensor(wrong), last.numel()) * 1e4)
        return worse

    monkeypatch.setattr(koala, "reverse_kd", one_class)
    outcome = Koala(teachers, proxy, labels, cohort="k").aggregate(
        1, students, {"standard": spec}, updates
    )
    assert outcome.server_model_version == 1 and teachers.versions() == [1]
    taught = outcome.students["standard"]  # forward KD from the server model it kept
    assert any(not np.allclose(taught[k], v) for k, v in students["standard"].items())

    monkeypatch.setattr(koala, "reverse_kd", lambda *_a, **_k: copy.deepcopy(server))
    again = Koala(teachers, proxy, labels, cohort="k").aggregate(
        2, students, {"standard": spec}, updates
    )
    assert again.server_model_version == 2 and teachers.versions() == [1, 2]


def test_cloud_labels_hold_out_every_fifth_sample() -> None:
    data = load_dataset("digits")
    labels = koala.CloudLabels.split(data)
    assert len(labels.heldout) == (len(data) + 4) // 5
    assert len(labels.train) + len(labels.heldout) == len(data)
    np.testing.assert_array_equal(labels.heldout.y, data.y[::5])


def test_forward_kd_also_learns_the_clouds_own_labels_when_it_has_some() -> None:
    """A server model that knows nothing (random weights) teaches nothing on its own; with
    the cloud's labelled data as the anchor the class's student learns the task anyway."""
    data = cloud_split(load_dataset("digits"), 0.4)
    labels = koala.CloudLabels.split(data.train)
    spec = zoo.default_student(DIGITS)
    server = zoo.build(zoo.default_teacher(DIGITS), 7)
    settings = koala.TransferSettings(forward_epochs=30, learning_rate=0.01)

    def student_after(anchor: Dataset | None) -> float:
        student = zoo.build(spec, 3)
        fit_inputs(student, data.train.x)
        koala.forward_kd(student, server, data.train.x, settings, seed=1, anchor=anchor)
        held = labels.heldout
        return float((predict(student, held.x).argmax(1) == held.y).mean())

    alone, anchored = student_after(None), student_after(labels.train)
    assert anchored > 0.6 and anchored > alone + 0.3, (alone, anchored)
