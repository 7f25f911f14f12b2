"""Shared fixtures: a cloud service (real logic) and a real gRPC server on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from cloud_service.registry import ModelRegistry
from cloud_service.server import build_grpc_server
from cloud_service.service import CloudConfig, CloudService
from cloud_service.sessions import SessionStore
from cloud_service.teacher import Teacher
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.signature import DatasetSignature
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc

torch.set_num_threads(1)
# The first optimizer a process makes imports torch._dynamo: 20 s on a loaded 2-core box.
# Pay it here, once, rather than inside the first Register call's deadline.
torch.optim.Adam([torch.zeros(1, requires_grad=True)])
# Deadline of a test's RPC: a guard against a hang, not a speed goal; a loaded 2-core
# box can take seconds over a call that takes milliseconds alone.
RPC_TIMEOUT = 60.0
DIGITS = DatasetSignature((1, 8, 8), 10, "digits")


@pytest.fixture(scope="session")
def digits_teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained digits teacher (8 epochs), saved once for every module that starts
    clouds with ``--teacher`` from it; nothing writes to it."""
    from cloud_service.teacher import train_teacher

    path = tmp_path_factory.mktemp("digits-teacher") / "teacher.safetensors"
    train_teacher("digits", hyper=Hyperparameters(epochs=8, learning_rate=0.001)).save(path)
    return path


def make_teacher(signature: DatasetSignature = DIGITS, seed: int = 7) -> Teacher:
    """An untrained but fixed teacher: enough for protocol and equivalence tests."""
    spec = zoo.default_teacher(signature)
    model = zoo.build(spec, seed)
    model.eval()
    return Teacher(spec, model, None, signature.name)


def make_service(
    tmp_path: Path,
    *,
    hyper: Hyperparameters | None = None,
    store: SessionStore | None = None,
    teacher: Teacher | None = None,
) -> CloudService:
    return CloudService(
        teacher or make_teacher(),
        ModelRegistry(tmp_path / "models"),
        SessionStore() if store is None else store,
        CloudConfig(hyper=hyper or Hyperparameters(epochs=1, batch_size=16)),
    )


@dataclass
class LiveCloud:
    service: CloudService
    address: str
    stub: pb_grpc.SplitTrainingStub
    channel: grpc.Channel


@pytest.fixture
def live_cloud(tmp_path: Path) -> Iterator[LiveCloud]:
    service = make_service(tmp_path)
    server, port = build_grpc_server(service, "127.0.0.1:0", max_message_bytes=4 * 1024 * 1024)
    server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    try:
        yield LiveCloud(service, address, pb_grpc.SplitTrainingStub(channel), channel)  # type: ignore[no-untyped-call]
    finally:
        channel.close()
        server.stop(0)


def apply_steps(service: CloudService, session_id: str, count: int, start: int = 0) -> None:
    """``count`` real training steps in-process, from step ``start`` (a session holds
    capacity, is checkpointed and may be finished only once it has trained)."""
    session = service.sessions.get(session_id)
    for step in range(start, start + count):
        rng = np.random.default_rng(step)
        service.step(
            session_id,
            step,
            rng.standard_normal((4, *session.student_activation_shape)).astype(np.float32),
            rng.standard_normal((4, *session.teacher_activation_shape)).astype(np.float32),
            rng.integers(0, session.num_classes, 4),
        )


def wait_for(
    what: str, condition: Callable[[], object], timeout: float = 60.0, interval: float = 0.02
) -> None:
    """Poll ``condition`` until it holds; the generous deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
