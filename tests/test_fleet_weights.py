"""The frugal wire of federated cohorts (fedwire): weights as int8 deltas.

Unit tests of the quantiser (error bound, unbiased rounding, error feedback),
then a live federated cohort on int8-delta (cloud and devices hold the same
bits every round, fewer bytes than float32), negotiation at join, and every
malformed delta refused without touching the aggregate.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cloud_service.fleet.config import load_plans
from cloud_service.fleet.service import FleetService, FleetSettings
from cloud_service.server import build_grpc_server
from edge_agent.client import CloudClient
from edge_agent.errors import CloudRefused
from edge_agent.fleet import _submit, run_rounds
from edge_agent.fleet_weights import HeldStudent, StaleBase
from edge_agent.telemetry import TrainingTelemetry
from splitkd import codec, koala
from splitkd import weights_codec as wc
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import Shard, cloud_split
from splitkd.errors import FailedPrecondition, InvalidArgument
from splitkd.messages import CohortConfig, RoundState, RoundTask, Update
from splitkd.models import zoo
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, make_service


# -- the quantiser ---------------------------------------------------------------------
def _row_scales(encoded: Any) -> np.ndarray:
    rows = encoded.shape[0] if len(encoded.shape) >= 2 else 1
    return np.asarray(encoded.scale).reshape(rows, *([1] * (len(encoded.shape) - 1)))


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 64), (16,), (1, 1, 1)])
def test_int8_deltas_are_within_one_step_per_row_and_unbiased(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    # Rows of very different ranges: per-row scales keep the small rows precise.
    delta = rng.normal(size=shape).astype(np.float32)
    if len(shape) >= 2:
        delta *= np.logspace(-4, 0, shape[0], dtype=np.float32).reshape(-1, *[1] * (len(shape) - 1))
    quantiser = wc.DeltaQuantiser(seed=1)
    encoded = quantiser.encode(delta)
    assert encoded.values.dtype == np.int8 and encoded.shape == shape
    assert len(encoded.scale) == (shape[0] if len(shape) >= 2 else 1)  # type: ignore[arg-type]
    error = np.abs(wc.decode(encoded) - delta)
    assert (error <= _row_scales(encoded) * 1.0001).all()  # within one quantisation step
    # Stochastic rounding is unbiased: the mean of many encodings converges on the delta,
    # but at a row's extremes, where the int8 range clips (the zero point is rounded).
    mean = np.mean([wc.decode(quantiser.encode(delta)) for _ in range(400)], axis=0)
    bias = np.abs(mean - delta) / _row_scales(encoded)
    rows = delta.reshape(encoded.scale.size, -1)  # type: ignore[union-attr]
    extreme = (rows == rows.min(axis=1, keepdims=True)) | (rows == rows.max(axis=1, keepdims=True))
    assert (bias.reshape(rows.shape)[~extreme] <= 0.2).all()
    assert (bias <= 0.55).all()


def test_a_zero_delta_decodes_to_exact_zeros() -> None:
    encoded = wc.DeltaQuantiser().encode(np.zeros((4, 3), np.float32))
    assert (wc.decode(encoded) == 0).all() and (encoded.scale > 0).all()  # type: ignore[operator]


def test_error_feedback_keeps_the_accumulated_error_within_one_step() -> None:
    """Without feedback the rounding errors of R uploads add up (a random walk); with it the
    sum the cloud received differs from what the device trained by one upload's residual."""
    rng = np.random.default_rng(3)
    base = {"w": rng.normal(size=(8, 5)).astype(np.float32)}
    step = {"w": (rng.normal(size=(8, 5)) * 0.01).astype(np.float32)}
    trained = {"w": base["w"] + step["w"]}
    encoder, plain = wc.UploadEncoder(seed=5), wc.DeltaQuantiser(seed=5)
    received = np.zeros((8, 5), np.float64)
    without = np.zeros((8, 5), np.float64)
    rounds = 200
    for _ in range(rounds):
        packed = encoder.encode(trained, base)["w"]
        received += wc.decode(packed)
        without += wc.decode(plain.encode(step["w"]))
        assert (np.abs(encoder.residual["w"]) <= _row_scales(packed) * 1.0001).all()
    owed = rounds * step["w"].astype(np.float64)
    np.testing.assert_allclose(received + encoder.residual["w"], owed, atol=1e-4)
    assert np.abs(received - owed).max() < np.abs(without - owed).max()
    encoder.reset()
    assert not encoder.residual


def test_digests_name_exact_bits() -> None:
    weights = koala.weights_of(zoo.build(zoo.default_student(DIGITS), 1))
    same = {k: v.copy() for k, v in weights.items()}
    assert wc.digest(weights) == wc.digest(same) != 0
    flipped = {k: v.copy() for k, v in weights.items()}
    name = sorted(flipped)[2]
    flipped[name].reshape(-1)[0] = np.nextafter(flipped[name].reshape(-1)[0], np.float32(1))
    assert wc.digest(flipped) != wc.digest(weights)


def test_a_delta_that_does_not_fit_the_held_student_is_refused_on_the_device() -> None:
    held = HeldStudent.for_member(wc.INT8_DELTA, 0)
    whole = {"w": np.ones((2, 2), np.float32)}
    held.take(RoundTask(RoundState.TRAINING, 1, whole, weights_digest=wc.digest(whole)))
    assert held.held_digest() == wc.digest(whole)
    with pytest.raises(StaleBase):  # a delta against another version
        held.take(RoundTask(RoundState.TRAINING, 2, whole, weights_base=12345))
    with pytest.raises(StaleBase):  # the result differs from the cloud's
        held.take(
            RoundTask(RoundState.TRAINING, 2, whole, weights_base=held.digest, weights_digest=7)
        )


# -- a live cohort -----------------------------------------------------------------------
class Live:
    def __init__(self, tmp_path: Path, config: CohortConfig) -> None:
        self.service = make_service(tmp_path)
        anchor = cloud_split(load_dataset("digits"), 0.4).train
        labels = koala.CloudLabels.split(anchor)
        settings = FleetSettings(config, {}, anchor.x, labels, tmp_path / "cohorts")
        self.fleet = FleetService(self.service, settings)
        self.server, port = build_grpc_server(self.service, "127.0.0.1:0", fleet=self.fleet)
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.FleetStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)
        self.fleet.close()


def _live(tmp_path: Path, **config: Any) -> Iterator[Live]:
    settings = {"min_devices": 2, "rounds": 3, "local_epochs": 1, "round_timeout_seconds": 60}
    live = Live(tmp_path, CohortConfig("federated", **{**settings, **config}))  # type: ignore[arg-type]
    try:
        yield live
    finally:
        live.close()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    yield from _live(tmp_path)


def _cohort_run(live: Live, codec_name: str) -> dict[int, Any]:
    dataset = load_dataset("digits")
    runs: dict[int, Any] = {}
    errors: list[BaseException] = []

    def device(i: int) -> None:
        try:
            split = edge_split(dataset, Shard(i, 2), alpha=0.3, presumed_fraction=0.4)
            with CloudClient(live.address) as client:
                join = client.join_cohort(
                    f"edge-{i}", "k", dataset.signature, len(split.train), weights_codec=codec_name
                )
                telemetry = TrainingTelemetry("raspberry-pi-4", "wifi")
                runs[i] = (join, run_rounds(client, join, split, telemetry, f"edge-{i}"))
        except BaseException as exc:  # surfaced in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    return runs


@pytest.mark.slow
def test_cloud_and_devices_hold_the_same_bits_and_move_fewer_bytes(tmp_path: Path) -> None:
    sent: dict[str, int] = {}
    for codec_name in ("float32", "int8-delta"):
        for live in _live(tmp_path / codec_name, rounds=3):
            live.fleet.mirrors.drop = lambda _ids: None  # type: ignore[method-assign]  # keep them to compare
            runs = _cohort_run(live, codec_name)
            sent[codec_name] = sum(
                sum(r.bytes_up + r.bytes_down for r in run.rounds) for _, run in runs.values()
            )
            for join, run in runs.values():
                assert join.weights_codec == codec_name
                assert [r.round for r in run.rounds] == [1, 2, 3]
                if codec_name == "float32":
                    assert live.fleet.mirrors.held(join.member_id) is None
                    continue
                # Every round the device checked the cloud's digest of what it holds (a
                # mismatch would have made it fetch whole weights); the last, bit for bit:
                assert run.held.whole_fetches == 0
                cloud = live.fleet.mirrors.held(join.member_id)
                assert cloud is not None and cloud.keys() == run.held.weights.keys()
                for name, value in run.held.weights.items():
                    assert np.array_equal(cloud[name], value), name
                # Rounds after the first download deltas: a fraction of round 1's bytes.
                assert all(r.bytes_down < run.rounds[0].bytes_down * 0.6 for r in run.rounds[1:])
    assert sent["int8-delta"] < sent["float32"] * 0.6, sent


def _join(live: Live, device: str, codec_name: str = "") -> pb.JoinCohortResponse:
    request = pb.JoinCohortRequest(
        device_id=device,
        cohort="k",
        signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10),
        num_samples=100,
        weights_codec=codec_name,
    )
    reply: pb.JoinCohortResponse = live.stub.JoinCohort(request)
    return reply


def _refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_the_weights_codec_is_negotiated_at_join(tmp_path: Path) -> None:
    for live in _live(tmp_path / "any"):
        assert _join(live, "a").weights_codec == wc.DEFAULT_WEIGHTS_CODEC
        assert _join(live, "b", "float32").weights_codec == "float32"
        refused = _refusal(lambda live=live: _join(live, "c", "int4"))  # type: ignore[misc]
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    for live in _live(tmp_path / "only", weights_codec="float32", weights_codecs=("float32",)):
        error = _refusal(lambda live=live: _join(live, "a", "int8-delta"))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "float32" in error.details()
        assert _join(live, "a").weights_codec == "float32"  # the cohort goes on
        assert live.fleet.describe("k")["members"][0]["asks"]["weights_codec"] == "float32"  # type: ignore[index]


def test_cohort_file_weights_keys(tmp_path: Path) -> None:
    path = tmp_path / "cohorts.toml"
    path.write_text(
        '[cohorts.a]\nweights_codecs = ["float32"]\n[cohorts.b]\nweights_codec = "float32"\n'
    )
    plans = load_plans(path, CohortConfig())
    assert plans["a"].config.weights_codec == "float32"  # the first allowed is the default
    assert plans["b"].config.weights_codec == "float32" and not plans["b"].config.weights_codecs
    path.write_text('[cohorts.a]\nweights_codec = "int4"\n')
    with pytest.raises(InvalidArgument, match="unknown weights codec"):
        load_plans(path, CohortConfig())


def _delta_request(member: str, base: int, deltas: dict[str, Any]) -> pb.SubmitUpdateRequest:
    return pb.SubmitUpdateRequest(
        member_id=member, round=1, weights=wc.pack(deltas), num_samples=50, weights_base=base
    )


def _tampered(deltas: dict[str, Any], **fields: Any) -> pb.ModelWeights:
    message = wc.pack(deltas)
    for named in message.tensors:
        for key, value in fields.items():
            setattr(named.tensor, key, value)
    return message


def test_malformed_deltas_are_refused_without_touching_the_aggregate(live: Live) -> None:
    member = _join(live, "a").member_id
    plain = _join(live, "b", "float32").member_id
    task = live.stub.FetchRound(pb.FetchRoundRequest(member_id=member))
    assert task.weights_base == 0 and task.weights_digest  # the first round goes whole
    held = codec.decode_weights(task.weights)
    assert wc.digest(held) == task.weights_digest
    live.stub.FetchRound(pb.FetchRoundRequest(member_id=plain))
    cohort = live.fleet._cohorts["k"]
    before = {k: v.copy() for k, v in cohort.students["standard"].items()}
    quantiser = wc.DeltaQuantiser(seed=0)
    deltas = {k: quantiser.encode(np.full(v.shape, 0.01, np.float32)) for k, v in held.items()}
    base = task.weights_digest

    def submit(request: pb.SubmitUpdateRequest) -> Any:
        return live.stub.SubmitUpdate(request)

    renamed = {"x" + k: v for k, v in deltas.items()}
    reshaped = {k: quantiser.encode(np.zeros((2, *v.shape), np.float32)) for k, v in deltas.items()}
    bad_requests = {
        "names": _delta_request(member, base, renamed),
        "shapes": _delta_request(member, base, reshaped),
        "nan scale": _delta_request(member, base, deltas),
        "zero scale": _delta_request(member, base, deltas),
        "dtype": _delta_request(member, base, deltas),
        "overflow": _delta_request(member, base, deltas),
    }
    rows = {k: len(v.scale) for k, v in deltas.items()}  # type: ignore[arg-type]
    for name, value in (("nan scale", np.nan), ("zero scale", 0.0), ("overflow", 3e38)):
        request = bad_requests[name]
        for named in request.weights.tensors:
            named.tensor.scale = np.full(rows[named.name], value, "<f4").tobytes()
            named.tensor.data = np.full(len(named.tensor.data), 127, "i1").tobytes()
    for named in bad_requests["dtype"].weights.tensors:  # whole float32 values named as a delta
        named.tensor.CopyFrom(codec.encode(held[named.name]))
    for name, request in bad_requests.items():
        assert _refusal(lambda r=request: submit(r)).code() == grpc.StatusCode.INVALID_ARGUMENT, (
            name
        )
    mismatch = _refusal(lambda: submit(_delta_request(member, base ^ 1, deltas)))
    assert mismatch.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert wc.BASE_UNKNOWN in mismatch.details()
    # A member whose weights travel whole sends no deltas.
    not_negotiated = _refusal(lambda: submit(_delta_request(plain, base, deltas)))
    assert not_negotiated.code() == grpc.StatusCode.FAILED_PRECONDITION
    with cohort.lock:
        assert not cohort.pending
    for name, value in before.items():
        np.testing.assert_array_equal(cohort.students["standard"][name], value)
    # A well-formed delta is taken: the contribution is the base plus the decoded delta.
    assert submit(_delta_request(member, base, deltas)).accepted
    with cohort.lock:
        taken = cohort.pending[member].contribution.weights
    expected = wc.apply(held, {k: wc.decode(v) for k, v in deltas.items()})
    for name, value in expected.items():
        np.testing.assert_array_equal(taken[name], value)


def test_a_repeated_fetch_gets_the_same_delta_and_an_unknown_base_whole_weights(
    live: Live,
) -> None:
    member = _join(live, "a").member_id
    _join(live, "b")
    cohort = live.fleet._cohorts["k"]
    first = live.stub.FetchRound(pb.FetchRoundRequest(member_id=member))
    held = codec.decode_weights(first.weights)
    # The cloud moves the class student (as a closed round would); the device names its own.
    with cohort.lock:
        cohort.students["standard"] = {k: v + 0.05 for k, v in cohort.students["standard"].items()}
        cohort.round = 2
    expected = {k: tuple(v.shape) for k, v in held.items()}
    ask = pb.FetchRoundRequest(member_id=member, after_round=1, held_weights=first.weights_digest)
    delta, again = live.stub.FetchRound(ask), live.stub.FetchRound(ask)
    assert delta.weights_base == first.weights_digest
    assert (
        delta.weights == again.weights and delta.weights_digest == again.weights_digest
    )  # a retry
    assert delta.ByteSize() < first.ByteSize() * 0.5
    decoded = wc.unpack(delta.weights, expected, "deltas")
    mine = wc.apply(held, decoded)
    assert wc.digest(mine) == delta.weights_digest
    cloud = live.fleet.mirrors.held(member)
    assert cloud is not None
    for name, value in mine.items():
        assert np.array_equal(cloud[name], value)  # bit for bit
        assert np.abs(value - cohort.students["standard"][name]).max() < 0.01
    unknown = pb.FetchRoundRequest(member_id=member, after_round=1, held_weights=12345)
    whole = live.stub.FetchRound(unknown)
    assert whole.weights_base == 0 and len(whole.weights.tensors) == len(held)


def test_a_restarted_cloud_refuses_a_delta_and_the_device_sends_its_whole_student(
    tmp_path: Path,
) -> None:
    config = CohortConfig("federated", min_devices=1, rounds=2, local_epochs=1)
    settings = FleetSettings(config, {}, None, None, tmp_path / "cohorts")
    fleet = FleetService(make_service(tmp_path), settings)
    dataset = load_dataset("digits")
    member = fleet.join("a", "k", dataset.signature, 10, weights_codec="int8-delta").member_id
    task = fleet.fetch(member, 0)
    device = HeldStudent.for_member(wc.INT8_DELTA, 0)
    weights = device.take(task)
    fleet.close()
    again = FleetService(make_service(tmp_path), settings)  # the mirrors are gone
    trained = {k: v + 0.01 for k, v in weights.items()}
    update = Update(member, 1, trained, 10, 0.5)
    with pytest.raises(FailedPrecondition, match=wc.BASE_UNKNOWN):
        again.submit(_decoded(device.as_sent(update)))

    sent: list[Update] = []

    class Client:  # the edge's client, answering as the restarted cloud does
        def submit_update(self, update: Update) -> str:
            try:
                again.submit(_decoded(update) if update.weights_base else update)
            except FailedPrecondition as exc:
                raise CloudRefused("SubmitUpdate", "FAILED_PRECONDITION", str(exc)) from None
            sent.append(update)
            return "taken"

    assert _submit(Client(), update, device) == "taken"  # type: ignore[arg-type]
    assert sent[-1].weights_base == 0 and not device.encoder.residual
    with again._cohorts["k"].lock:
        taken = again._cohorts["k"].pending[member].contribution.weights
    for name, value in trained.items():
        np.testing.assert_array_equal(taken[name], value)
    again.close()


def _decoded(update: Update) -> Update:
    """What the cloud's servicer makes of a delta update (decoded, not yet applied)."""
    deltas = {k: wc.decode(v) for k, v in update.packed.items()}
    return Update(
        update.member_id,
        update.round,
        deltas,
        update.num_samples,
        0.5,
        weights_base=update.weights_base,
    )


def test_a_device_waiting_on_a_close_asks_again_about_when_it_should_be_done() -> None:
    from cloud_service.fleet.pace import MAX_RETRY_AFTER_SECONDS, ClosePace

    now = [0.0]
    pace = ClosePace(lambda: now[0])
    assert pace.retry_after("k", closing=True) == 0.5  # no close measured yet
    pace.began("k")
    now[0] = 4.0
    pace.ended("k")  # a close takes 4 s
    pace.began("k")
    now[0] = 5.0
    assert pace.retry_after("k", closing=True) == pytest.approx(0.9 * 4 - 1)
    assert pace.retry_after("k", closing=False) == 0.5  # waiting on other devices: unknown
    now[0] = 8.0
    assert pace.retry_after("k", closing=True) == 0.5  # overdue: ask often again
    pace.began("k")
    now[0] = 108.0
    pace.ended("k")
    pace.began("k")
    assert pace.retry_after("k", closing=True) == MAX_RETRY_AFTER_SECONDS


def test_forged_delta_messages_get_invalid_argument_and_nothing_else() -> None:
    """Random damage to a valid delta message: refused in one clear error, or decoded to
    exactly the expected shapes (the cloud then checks the result is finite)."""
    weights = koala.weights_of(zoo.build(zoo.default_student(DIGITS), 1))
    expected = {k: tuple(v.shape) for k, v in weights.items()}
    quantiser = wc.DeltaQuantiser(seed=2)
    good = wc.pack({k: quantiser.encode(v * 0.01) for k, v in weights.items()})
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(300):
        message = pb.ModelWeights()
        message.CopyFrom(good)
        tensor = message.tensors[int(rng.integers(len(message.tensors)))].tensor
        field = rng.choice(["shape", "scale", "zero_point", "data", "encoding", "dtype", "indices"])
        if field == "shape":
            tensor.shape[int(rng.integers(len(tensor.shape)))] = int(rng.integers(-2, 70))
        elif field in ("scale", "zero_point", "data", "indices"):
            raw = bytearray(getattr(tensor, field))
            cut = int(rng.integers(0, len(raw) + 1))
            raw = raw[:cut] + rng.bytes(int(rng.integers(0, 9)))
            setattr(tensor, field, bytes(raw))
        else:
            setattr(tensor, field, int(rng.integers(0, 8)))
        try:
            decoded = wc.unpack(message, expected, "fuzzed")
        except InvalidArgument:
            refused += 1
            continue
        assert {k: v.shape for k, v in decoded.items()} == expected
    assert refused > 150  # most damage is caught at the wire
