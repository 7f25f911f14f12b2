"""Split cohorts on the frugal wire: codecs and cuts negotiated at join, the teacher's
outputs cached per member across rounds, over real gRPC (in-process servers)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cloud_service.fleet.config import load_plans
from cloud_service.fleet.wire import MemberCaches
from edge_agent.client import CloudClient
from edge_agent.fleet import CohortRun, run_rounds
from edge_agent.telemetry import TrainingTelemetry
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import Shard
from splitkd.errors import InvalidArgument
from splitkd.messages import CohortConfig, SessionAsk
from splitkd.v1 import splitkd_pb2 as pb
from tests.test_fleet import LiveFleet, _live_fleet, _status

FRUGAL = SessionAsk(wire_codec="int8-stochastic", student_cut=2)


@contextmanager
def _split_fleet(tmp_path: Path, devices: int = 2, **wire: Any) -> Iterator[LiveFleet]:
    config = CohortConfig(
        "split", min_devices=devices, rounds=2, local_epochs=1, round_timeout_seconds=60,
        **wire,
    )  # fmt: skip
    yield from _live_fleet(tmp_path, config, proxy=False)


@pytest.fixture
def split_fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with _split_fleet(tmp_path) as live:
        yield live


def _train(live: LiveFleet, devices: int, ask: SessionAsk, cache: bool = True) -> list[CohortRun]:
    """``devices`` devices of one split cohort, each a thread with its own gRPC client."""
    dataset = load_dataset("digits")
    runs: dict[int, CohortRun] = {}
    errors: list[BaseException] = []

    def device(i: int) -> None:
        try:
            split = edge_split(dataset, Shard(i, devices), alpha=0.3, presumed_fraction=0.4)
            samples = len(split.train) if cache else 0
            with CloudClient(live.address) as client:
                join = client.join_cohort(
                    f"edge-{i}", "kitchen", dataset.signature, len(split.train),
                    device_profile="raspberry-pi-4",
                    ask=SessionAsk(ask.wire_codec, samples, ask.student_cut),
                )  # fmt: skip
                runs[i] = run_rounds(
                    client, join, split, TrainingTelemetry("raspberry-pi-4", "wifi")
                )
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    return [runs[i] for i in range(devices)]


def _bytes(run: CohortRun) -> int:
    return sum(r.bytes_up + r.bytes_down for r in run.rounds)


def test_a_split_cohort_on_int8_with_the_cache_moves_a_fraction_of_the_bytes(
    tmp_path: Path,
) -> None:
    with _split_fleet(tmp_path / "old") as live:
        old = _train(live, 2, SessionAsk(), cache=False)
    with _split_fleet(tmp_path / "frugal") as live:
        frugal = _train(live, 2, FRUGAL)
        held = live.service.cache_bytes()
    for run in frugal:
        assert run.wire == {"codec": "int8-stochastic", "student_cut": 2, "teacher_cache": True}
        assert all(r.steps > 0 for r in run.rounds)
        # Round 1 sent each sample's teacher activations; round 2 (a new session) none.
        assert run.rounds[1].bytes_up < 0.7 * run.rounds[0].bytes_up
    for before, after in zip(old, frugal, strict=True):
        assert before.wire["codec"] == "float32" and before.wire["teacher_cache"] is False
        assert _bytes(after) < _bytes(before) / 4, (_bytes(after), _bytes(before))
    # It trains: round 2 starts from round 1's averaged student, measured on each device's
    # held-out data, above chance (0.1; the teacher here is untrained) and as the old wire.
    accuracy = {
        w: np.mean([r.rounds[1].accuracy for r in runs])
        for w, runs in (("old", old), ("int8", frugal))
    }
    assert accuracy["int8"] > 0.3 and accuracy["int8"] > accuracy["old"] - 0.05, accuracy
    # The members' caches went with the completed cohort: nothing held, nothing reserved.
    assert held == (0, 0)


def test_a_member_cache_lost_between_rounds_is_sent_again(
    split_fleet: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As after a cloud restart: every round session gets a new, empty cache.
    granted = MemberCaches.cache_for

    def forgetful(self: MemberCaches, member: Any, spec: Any, version: int) -> Any:
        self.drop([member.member_id])
        return granted(self, member, spec, version)

    monkeypatch.setattr(MemberCaches, "cache_for", forgetful)
    runs = _train(split_fleet, 2, FRUGAL)
    assert np.mean([r.rounds[1].accuracy for r in runs]) > 0.3
    for run in runs:
        assert run.wire["teacher_cache"] is True
        # CACHE_MISS, then the batches' teacher activations again: round 2 as heavy as 1.
        assert run.rounds[1].bytes_up > 0.9 * run.rounds[0].bytes_up


def test_the_cache_across_rounds_changes_no_result(tmp_path: Path) -> None:
    """float32, one device: the cohort's student after two rounds is the same whether
    round 2 took the teacher's outputs from the member's cache or from the wire."""
    students = []
    for cache in (False, True):
        with _split_fleet(tmp_path / str(cache), devices=1) as live:
            _train(live, 1, SessionAsk(wire_codec="float32"), cache=cache)
            students.append(live.fleet._cohorts["kitchen"].students["standard"])
    for name, weights in students[0].items():
        np.testing.assert_allclose(students[1][name], weights, atol=1e-5, err_msg=name)


def _join(live: LiveFleet, device: str, **ask: Any) -> pb.JoinCohortResponse:
    request = pb.JoinCohortRequest(
        device_id=device,
        cohort="kitchen",
        signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10),
        num_samples=100,
        **ask,
    )
    reply: pb.JoinCohortResponse = live.stub.JoinCohort(request)
    return reply


def test_a_codec_the_cohort_refuses_gets_a_clear_status(tmp_path: Path) -> None:
    allowed = ("int8-stochastic", "int8")
    config = {"wire_codec": "int8-stochastic", "wire_codecs": allowed, "student_cut": 2}
    with _split_fleet(tmp_path, **config) as live:
        _refuses_then_goes_on(live, allowed)


def _refuses_then_goes_on(live: LiveFleet, allowed: tuple[str, ...]) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _join(live, "a", wire_codec="float32")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not allow the wire codec 'float32'" in str(refused.value.details())
    assert _status(lambda: _join(live, "a", wire_codec="gzip")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _status(lambda: _join(live, "a", student_cut=9)) == grpc.StatusCode.INVALID_ARGUMENT
    assert live.fleet.describe("kitchen")["devices"] == 0  # nobody joined on a refused ask
    # The cohort goes on: one asks nothing (the cohort's wire), one asks int8 and cut 1.
    plain = _join(live, "a", train_samples=100)
    asking = _join(live, "b", wire_codec="int8", student_cut=1)
    assert plain.config.wire_codec == "int8-stochastic" and list(plain.config.wire_codecs) == [
        *allowed
    ]
    for reply, codec, cut, cache in ((plain, "int8-stochastic", 2, 100), (asking, "int8", 1, 0)):
        task = live.stub.FetchRound(pb.FetchRoundRequest(member_id=reply.member_id))
        assert task.state == pb.ROUND_STATE_TRAINING
        assert task.session.hyperparameters.wire_codec == codec
        assert task.session.student_cut == cut
        assert task.session.teacher_cache_samples == cache


def test_member_caches_share_the_cloud_budget_and_follow_the_teacher_version(
    split_fleet: LiveFleet,
) -> None:
    from dataclasses import replace

    service, caches = split_fleet.service, split_fleet.fleet.caches
    spec = service.student_spec
    one = service.grant_cache(100, spec)
    assert one is not None
    service.config = replace(service.config, teacher_cache_bytes=one.reserved_bytes)
    cohort = split_fleet.fleet._cohort("kitchen")
    a = cohort.join("a", "standard", 100, SessionAsk(train_samples=100))
    b = cohort.join("b", "standard", 100, SessionAsk(train_samples=100))
    held = caches.cache_for(a, spec, version=1)
    assert held is not None and caches.cache_for(a, spec, version=1) is held  # kept
    assert caches.cache_for(b, spec, version=1) is None  # the budget is spent
    assert service.cache_bytes()[1] == held.reserved_bytes  # counted once
    fresh = caches.cache_for(a, spec, version=2)  # another teacher: not the old outputs
    assert fresh is not None and fresh is not held
    caches.drop([a.member_id])
    assert service.cache_bytes() == (0, 0)


def test_cohort_file_wire_keys(tmp_path: Path) -> None:
    path = tmp_path / "cohorts.toml"
    path.write_text(
        '[cohorts.a]\nmode = "split"\nwire_codecs = ["int8", "float16"]\nstudent_cut = 2\n'
        '[cohorts.b]\nwire_codec = "float16"\n'
    )
    plans = load_plans(path, CohortConfig())
    assert plans["a"].config.wire_codec == "int8"  # the first listed is the default
    assert plans["a"].config.wire_codecs == ("int8", "float16")
    assert plans["a"].config.student_cut == 2
    assert plans["b"].config.wire_codec == "float16" and plans["b"].config.wire_codecs == ()
    for bad in (
        '[cohorts.a]\nwire_codec = "gzip"\n',
        '[cohorts.a]\nwire_codec = "float32"\nwire_codecs = ["int8"]\n',
        '[cohorts.a]\nwire_codecs = "int8"\n',
        "[cohorts.a]\nstudent_cut = -1\n",
    ):
        path.write_text(bad)
        with pytest.raises(InvalidArgument):
            load_plans(path, CohortConfig())
