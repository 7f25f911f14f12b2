"""Split KD over real gRPC is the same computation as KD in one process."""

from pathlib import Path

import numpy as np
import pytest

from cloud_service.server import build_grpc_server
from edge_agent.client import CloudClient
from edge_agent.trainer import EdgeTrainer, GrpcTransport
from splitkd.classes import balanced_weights
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import DEMO_PRESUMED_FRACTION, EdgeSplit, Shard
from splitkd.hyper import Hyperparameters
from splitkd.messages import SessionAsk
from splitkd.training import train_kd_centralised
from tests.support import make_service


def _digits_shard() -> EdgeSplit:
    return edge_split(load_dataset("digits"), Shard(0, 2), presumed_fraction=DEMO_PRESUMED_FRACTION)


def _split_run(
    tmp_path: Path,
    hyper: Hyperparameters,
    wire: str,
    class_weights: tuple[float, ...] = (),
    cache: bool = False,
) -> tuple[list[float], object, object]:
    service = make_service(tmp_path, hyper=hyper)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    data = load_dataset("digits")
    split = _digits_shard()
    try:
        with CloudClient(f"127.0.0.1:{port}") as client:
            session = client.register(
                "edge-eq",
                data.signature,
                class_weights=class_weights,
                ask=SessionAsk(wire_codec=wire, train_samples=len(split.train) if cache else 0),
            )
            trainer = EdgeTrainer(
                session, split.train, split.heldout, GrpcTransport(client, session)
            )
            result = trainer.run()
            traffic = client.traffic
    finally:
        server.stop(0)
    return [r.loss for r in result.history], service, traffic


@pytest.mark.parametrize(("optimizer", "cache"), [("adam", False), ("sgd", False), ("adam", True)])
def test_split_losses_match_centralised_kd(tmp_path: Path, optimizer: str, cache: bool) -> None:
    """With the teacher-output cache too: epoch 2 takes the teacher's logits from the
    cloud's cache, and the losses are still those of centralised KD."""
    hyper = Hyperparameters(
        epochs=2, batch_size=16, optimizer=optimizer, learning_rate=0.01, seed=3
    )
    split_losses, service, _ = _split_run(tmp_path, hyper, "float32", cache=cache)
    cloud_cache = service.cache_bytes()  # type: ignore[attr-defined]
    assert (cloud_cache[1] > 0) == cache
    split = _digits_shard()
    reference = train_kd_centralised(
        service.student_spec, service.teacher.model, split.train, hyper
    )  # type: ignore[attr-defined]
    assert len(split_losses) == len(reference.losses) == 2 * ((len(split.train) + 15) // 16)
    np.testing.assert_allclose(split_losses, reference.losses, rtol=1e-5, atol=0)
    # The losses really moved: a run that applied no update would not match a training curve.
    assert reference.losses[-1] < reference.losses[0]


def test_float16_wire_halves_activation_bytes_and_still_trains(tmp_path: Path) -> None:
    hyper = Hyperparameters(epochs=1, batch_size=16, seed=3)
    losses32, _, traffic32 = _split_run(tmp_path / "a", hyper, "float32")
    losses16, _, traffic16 = _split_run(tmp_path / "b", hyper, "float16")
    assert traffic16.bytes_up < 0.6 * traffic32.bytes_up  # type: ignore[attr-defined]
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2)


def test_split_losses_match_centralised_kd_with_balanced_class_weights(tmp_path: Path) -> None:
    """The device's class weights reach the cloud's CE term: the same losses as centralised
    KD with the same weights, and other losses than without them."""
    hyper = Hyperparameters(epochs=1, batch_size=16, seed=3)
    split = _digits_shard()
    # A skewed shard: classes 0-4 keep a fifth of their samples, so the weights differ.
    keep = np.flatnonzero((split.train.y >= 5) | (np.arange(len(split.train)) % 5 == 0))
    train = split.train.subset(keep)
    weights = tuple(float(w) for w in balanced_weights(train.y, 10))
    assert max(weights) > 2 * min(weights)
    service = make_service(tmp_path, hyper=hyper)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        with CloudClient(f"127.0.0.1:{port}") as client:
            session = client.register("edge-w", train.signature, class_weights=weights)
            transport = GrpcTransport(client, session)
            split_losses = [
                r.loss for r in EdgeTrainer(session, train, split.heldout, transport).run().history
            ]
    finally:
        server.stop(0)
    teacher = service.teacher.model
    reference = train_kd_centralised(service.student_spec, teacher, train, hyper, weights)
    np.testing.assert_allclose(split_losses, reference.losses, rtol=1e-5, atol=0)
    unweighted = train_kd_centralised(service.student_spec, teacher, train, hyper)
    assert not np.allclose(unweighted.losses, reference.losses, rtol=1e-3)
