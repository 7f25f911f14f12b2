"""Identity and transport security: TLS, mutual TLS, HTTPS, device enrollment and access.

Certificates are made by ``splitkd-cloud certs`` and devices enrolled by
``splitkd-cloud devices add``, both run as real processes; servers are real
gRPC servers on loopback (in-process, and one real ``splitkd-cloud serve``).
"""

from __future__ import annotations

import ast
import http.client
import json
import logging
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient

from cloud_service.devices import DeviceRegistry
from cloud_service.http_api import create_app
from cloud_service.security import CloudSecurity
from cloud_service.server import build_grpc_server
from cloud_service.service import CloudService
from edge_agent.security import EdgeSecurity, open_channel, read_credential
from splitkd.demo import free_port
from splitkd.errors import SplitKDError
from splitkd.telemetry import exposition
from splitkd.tls import ClientTLS, ServerTLS, server_tls
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, apply_steps, make_service

ROOT = Path(__file__).resolve().parent.parent
CLI_ENV = {"PYTHONUNBUFFERED": "1", "SPLITKD_LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin"}


def cloud_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud_service.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**CLI_ENV, "PYTHONPATH": str(ROOT)},
    )


def start_cloud_cli(*args: str, cwd: Path = ROOT) -> subprocess.Popen[str]:
    """``cloud_cli`` started, not waited for: ``communicate()`` gives its output."""
    return subprocess.Popen(
        [sys.executable, "-m", "cloud_service.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**CLI_ENV, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    done = cloud_cli("certs", "--out", str(out), "--device", "edge-a", "--device", "edge-b")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated development CA: its certificates must not be trusted."""
    out = tmp_path_factory.mktemp("other-certs")
    assert cloud_cli("certs", "--out", str(out), "--device", "edge-a").returncode == 0
    return out


@dataclass
class Server:
    service: CloudService
    address: str
    devices: DeviceRegistry
    server: grpc.Server


def start(tmp_path: Path, *, tls: ServerTLS | None = None, require_auth: bool = False) -> Server:
    service = make_service(tmp_path)
    devices = DeviceRegistry.in_state_dir(tmp_path)
    security = CloudSecurity(tls, devices, require_auth)
    server, port = build_grpc_server(service, "127.0.0.1:0", security=security)
    server.start()
    return Server(service, f"127.0.0.1:{port}", devices, server)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.server.stop(0)


def stub(address: str, tls: ClientTLS | None = None) -> pb_grpc.SplitTrainingStub:
    credentials = tls.grpc_credentials() if tls is not None else None
    channel = open_channel(address, [], credentials)
    return pb_grpc.SplitTrainingStub(channel)


def register_request(device: str) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        device_id=device,
        signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10, name="digits"),
    )


def auth(device: str, credential: str) -> tuple[tuple[str, str], ...]:
    return EdgeSecurity(credential=credential).call_metadata(device)


def refused(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


# --- TLS and mutual TLS ------------------------------------------------------------------


def test_certs_command_writes_pem_files_and_keeps_the_ca(certs: Path) -> None:
    names = sorted(p.name for p in certs.iterdir())
    assert names == [
        "ca-key.pem", "ca.pem", "device-edge-a-key.pem", "device-edge-a.pem",
        "device-edge-b-key.pem", "device-edge-b.pem", "server-key.pem", "server.pem",
    ]  # fmt: skip
    for path in certs.iterdir():
        assert path.read_text().startswith("-----BEGIN "), path
        if path.name.endswith("-key.pem"):
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    ca = (certs / "ca.pem").read_bytes()
    again = cloud_cli("certs", "--out", str(certs), "--device", "edge-c")
    assert again.returncode == 0 and "kept" in again.stdout
    assert (certs / "ca.pem").read_bytes() == ca
    (certs / "device-edge-c.pem").unlink()
    (certs / "device-edge-c-key.pem").unlink()


def test_tls_client_trusting_the_ca_works_and_plaintext_fails(
    certs: Path, other_ca: Path, tmp_path: Path, servers: list[Server]
) -> None:
    tls = server_tls(certs / "server.pem", certs / "server-key.pem")
    server = start(tmp_path, tls=tls)
    servers.append(server)
    reply = stub(server.address, ClientTLS(ca=certs / "ca.pem")).Register(
        register_request("edge-a"), timeout=10
    )
    assert len(reply.session_id) == 32
    plaintext = stub(server.address)
    code = refused(lambda: plaintext.Register(register_request("edge-a"), timeout=5))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # A server certificate from a CA the client does not trust is refused too.
    untrusting = stub(server.address, ClientTLS(ca=other_ca / "ca.pem"))
    code = refused(lambda: untrusting.Register(register_request("edge-a"), timeout=5))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_mutual_tls_requires_a_device_certificate_from_the_ca(
    certs: Path, other_ca: Path, tmp_path: Path, servers: list[Server]
) -> None:
    tls = server_tls(
        certs / "server.pem", certs / "server-key.pem", certs / "ca.pem", require_client_cert=True
    )
    server = start(tmp_path, tls=tls)
    servers.append(server)
    ca = certs / "ca.pem"
    without_cert = stub(server.address, ClientTLS(ca=ca))
    code = refused(lambda: without_cert.Register(register_request("edge-a"), timeout=5))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    foreign = stub(
        server.address,
        ClientTLS(ca, other_ca / "device-edge-a.pem", other_ca / "device-edge-a-key.pem"),
    )
    code = refused(lambda: foreign.Register(register_request("edge-a"), timeout=5))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    device = stub(
        server.address, ClientTLS(ca, certs / "device-edge-a.pem", certs / "device-edge-a-key.pem")
    )
    assert device.Register(register_request("edge-a"), timeout=10).session_id


def test_a_device_certificate_works_only_with_its_own_devices_credential(
    certs: Path, tmp_path: Path, servers: list[Server]
) -> None:
    tls = server_tls(
        certs / "server.pem", certs / "server-key.pem", certs / "ca.pem", require_client_cert=True
    )
    server = start(tmp_path, tls=tls)
    servers.append(server)
    credentials = {name: server.devices.add(name) for name in ("edge-a", "edge-b")}
    ca = certs / "ca.pem"
    with_cert_of_a = stub(
        server.address, ClientTLS(ca, certs / "device-edge-a.pem", certs / "device-edge-a-key.pem")
    )
    with pytest.raises(grpc.RpcError) as info:
        with_cert_of_a.Register(
            register_request("edge-b"), metadata=auth("edge-b", credentials["edge-b"]), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate" in (info.value.details() or "")
    own = with_cert_of_a.Register(
        register_request("edge-a"), metadata=auth("edge-a", credentials["edge-a"]), timeout=10
    )
    assert own.session_id


def test_a_corrupt_device_registry_is_one_line_at_start_up_and_no_path_in_answers(
    tmp_path: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    garbages = ("[]", "{", '{"format": 1, "devices": {"a": {"name": 1}}}',
                '{"format": 1, "devices": {"a": {"name": "a", "state": "enrolled", '
                '"salt": "zz", "digest": "00", "enrolled_at": ""}}}')  # fmt: skip
    # One cloud per registry, all started at once: each in its own folder, ./state.
    started: list[tuple[str, subprocess.Popen[str]]] = []
    try:
        for i, garbage in enumerate(garbages):
            folder = tmp_path / f"corrupt-{i}"
            (folder / "state").mkdir(parents=True)
            (folder / "state" / "devices.json").write_text(garbage)
            started.append((garbage, start_cloud_cli("serve", "--state-dir", "state", cwd=folder)))
        for garbage, process in started:
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 2, (garbage, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and "state/devices.json" in lines[0], (garbage, stderr)
            assert str(tmp_path) not in stderr
    finally:
        for _, process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    # Damaged while the cloud runs: answers say nothing of the server's files.
    server = start(tmp_path / "running")
    servers.append(server)
    credential = server.devices.add("edge-a")
    cloud = stub(server.address)
    assert cloud.Register(register_request("edge-a"), metadata=auth("edge-a", credential))
    server.devices.path.write_text("{")
    with pytest.raises(grpc.RpcError) as info:
        cloud.Register(register_request("edge-a"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert str(tmp_path) not in (info.value.details() or "")
    answer = cloud.Register(
        register_request("edge-a"), metadata=auth("edge-a", credential), timeout=10
    )
    assert answer.session_id  # the last good registry still applies
    client = TestClient(create_app(server.service, CloudSecurity(None, server.devices)))
    health = client.get("/healthz")
    assert health.status_code == 200 and str(tmp_path) not in health.text
    # A registry that was never read well refuses everyone (fails closed).
    never_good = DeviceRegistry.in_state_dir(tmp_path / f"corrupt-{len(garbages) - 1}" / "state")
    assert never_good.has_entries()
    assert never_good.verify("a", "anything").name == "UNKNOWN"


def test_tls_options_fail_fast_with_actionable_messages(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(SplitKDError, match="needs --tls-ca"):
        server_tls(certs / "server.pem", certs / "server-key.pem", require_client_cert=True)
    with pytest.raises(SplitKDError, match="both --tls-cert and --tls-key"):
        server_tls(certs / "server.pem", None)
    with pytest.raises(SplitKDError, match=r"does not exist \(make development files"):
        server_tls(tmp_path / "nope.pem", certs / "server-key.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(SplitKDError, match="not a PEM file"):
        ClientTLS(ca=tmp_path / "junk.pem").check()
    assert server_tls(None, None) is None


# --- Device enrollment ------------------------------------------------------------------


def test_enroll_list_revoke_through_the_cli(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    added = cloud_cli("devices", "add", "edge-a", "--state-dir", state)
    assert added.returncode == 0, added.stderr
    credential = added.stdout.splitlines()[1].strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", credential)
    file = tmp_path / "edge-b.credential"
    added_b = cloud_cli(
        "devices", "add", "edge-b", "--state-dir", state, "--credential-file", str(file)
    )
    assert added_b.returncode == 0 and file.stat().st_mode & 0o077 == 0
    credential_b = file.read_text().strip()
    assert credential_b not in added_b.stdout

    again = cloud_cli("devices", "add", "edge-a", "--state-dir", state)
    assert again.returncode == 2 and "already enrolled" in again.stderr
    listed = cloud_cli("devices", "list", "--state-dir", state)
    assert listed.returncode == 0
    assert re.search(r"edge-a\s+enrolled", listed.stdout) and "edge-b" in listed.stdout
    stored = (tmp_path / "state" / "devices.json").read_text()
    for secret in (credential, credential_b):
        assert secret not in listed.stdout and secret not in stored
    assert (tmp_path / "state" / "devices.json").stat().st_mode & 0o077 == 0

    revoked = cloud_cli("devices", "revoke", "edge-a", "--state-dir", state)
    assert revoked.returncode == 0 and "revoked edge-a" in revoked.stdout
    as_json = json.loads(cloud_cli("devices", "list", "--state-dir", state, "--json").stdout)
    states = {d["name"]: d["state"] for d in as_json["devices"]}
    assert states == {"edge-a": "revoked", "edge-b": "enrolled"}
    assert set(as_json["devices"][0]) == {"name", "state", "enrolled_at", "revoked_at"}
    missing = cloud_cli("devices", "revoke", "edge-z", "--state-dir", state)
    assert missing.returncode == 2 and "not enrolled" in missing.stderr
    bad = cloud_cli("devices", "add", "../etc", "--state-dir", state)
    assert bad.returncode == 2 and "must be 1-64" in bad.stderr


# --- Authentication and access ----------------------------------------------------------


def test_unknown_wrong_missing_and_revoked_credentials_are_refused(
    tmp_path: Path, servers: list[Server], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start(tmp_path)
    servers.append(server)
    cloud = stub(server.address)
    # No device enrolled and no --require-auth: insecure development mode.
    assert cloud.Register(register_request("edge-a"), timeout=10).session_id
    credential = server.devices.add("edge-a")
    # From the first enrollment on, authentication is on without a restart.
    code = refused(lambda: cloud.Register(register_request("edge-a"), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    wrong = auth("edge-a", credential[:-2] + "xx")
    unknown = auth("edge-z", credential)
    with pytest.raises(grpc.RpcError) as info:
        cloud.Register(register_request("edge-z"), metadata=unknown, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "devices add edge-z" in (info.value.details() or "")
    code = refused(lambda: cloud.Register(register_request("edge-a"), metadata=wrong, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    right = auth("edge-a", credential)
    assert cloud.Register(register_request("edge-a"), metadata=right, timeout=10).session_id

    server.devices.revoke("edge-a")
    with pytest.raises(grpc.RpcError) as info:
        cloud.Register(register_request("edge-a"), metadata=right, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (info.value.details() or "")
    # A revoked device with a wrong credential learns nothing more than a stranger.
    code = refused(lambda: cloud.Register(register_request("edge-a"), metadata=wrong, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED

    metrics = exposition(server.service.metrics.registry)[0].decode()
    assert re.search(r'splitkd_cloud_auth_refusals_total\{reason="revoked"\} 1\.0', metrics)
    assert re.search(r'splitkd_cloud_auth_refusals_total\{reason="unknown"\} 3\.0', metrics)
    assert "refused" in caplog.text
    assert credential not in caplog.text and credential not in metrics
    assert credential[:-2] not in caplog.text


def test_require_auth_refuses_everyone_before_the_first_enrollment(
    tmp_path: Path, servers: list[Server]
) -> None:
    server = start(tmp_path, require_auth=True)
    servers.append(server)
    with pytest.raises(grpc.RpcError) as info:
        stub(server.address).Register(register_request("edge-a"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "--credential-file" in (info.value.details() or "")


def test_a_device_never_touches_another_devices_session_or_model(
    tmp_path: Path, servers: list[Server]
) -> None:
    server = start(tmp_path)
    servers.append(server)
    a = auth("edge-a", server.devices.add("edge-a"))
    b = auth("edge-b", server.devices.add("edge-b"))
    cloud = stub(server.address)
    session_a = cloud.Register(register_request("edge-a"), metadata=a, timeout=10).session_id

    with pytest.raises(grpc.RpcError) as info:
        cloud.Register(register_request("edge-a"), metadata=b, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "cannot act as 'edge-a'" in (info.value.details() or "")

    foreign_calls = {
        "Step": lambda md: cloud.Step(pb.StepRequest(session_id=session_a, step=0), metadata=md),
        "Evaluate": lambda md: cloud.Evaluate(
            pb.EvaluateRequest(session_id=session_a), metadata=md
        ),
        "Finish": lambda md: cloud.Finish(pb.FinishRequest(session_id=session_a), metadata=md),
        "Resume": lambda md: cloud.Resume(pb.ResumeRequest(session_id=session_a), metadata=md),
        "Heartbeat": lambda md: cloud.Heartbeat(
            pb.HeartbeatRequest(session_id=session_a), metadata=md
        ),
    }
    unknown = pb.HeartbeatRequest(session_id="0" * 32)
    with pytest.raises(grpc.RpcError) as info:
        cloud.Heartbeat(unknown, metadata=b)
    does_not_exist = info.value.details()
    for method, call in foreign_calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call(b)
        # Another device's session looks exactly like one that does not exist.
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, method
        assert info.value.details() == does_not_exist, method
    # The owner gets past the access check: its empty Step fails on the tensors instead.
    with pytest.raises(grpc.RpcError) as info:
        foreign_calls["Step"](a)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A's student, published from A's session: only A may download it.
    session = server.service.sessions.get(session_a)
    apply_steps(server.service, session_a, 1)
    record = server.service.finish(session_a, session.student.part_state(0, session.student_cut), 1)
    request = pb.DownloadModelRequest(name=record.name, version=0)
    answers = {}
    for name, version in [(record.name, 0), (record.name, 1), (record.name, 9), ("student-x", 1)]:
        with pytest.raises(grpc.RpcError) as info:
            ask = pb.DownloadModelRequest(name=name, version=version)
            list(cloud.DownloadModel(ask, metadata=b, timeout=10))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, (name, version)
        answers[name, version] = (info.value.details() or "").replace(name, "NAME")
    # B cannot tell A's model or its versions from models that do not exist.
    assert len({re.sub(r" version \d+", "", a) for a in answers.values()}) == 1
    assert "versions" not in answers[record.name, 9]
    chunks = list(cloud.DownloadModel(request, metadata=a, timeout=10))
    assert sum(len(c.data) for c in chunks) == record.size_bytes


def test_http_api_answers_a_device_about_its_own_models_only(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    devices = DeviceRegistry.in_state_dir(tmp_path)
    a = dict(auth("edge-a", devices.add("edge-a")))
    b = dict(auth("edge-b", devices.add("edge-b")))
    session = service.register("edge-a", DIGITS)
    apply_steps(service, session.session_id, 1)
    record = service.finish(
        session.session_id, session.student.part_state(0, session.student_cut), 1
    )
    client = TestClient(create_app(service, CloudSecurity(None, devices)))
    health = client.get("/healthz").json()
    assert health["auth"] == "on" and health["tls"] == "off"
    assert client.get("/metrics").status_code == 200
    anonymous = client.get("/v1/models")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=a).json()["models"][0]["name"] == record.name
    assert client.get("/v1/models", headers=b).json() == {"models": []}
    model_file = f"/v1/models/{record.name}/versions/1/model.onnx"
    # Another device's model answers exactly like one that does not exist.
    for path in (model_file, f"/v1/models/{record.name}/versions/1"):
        theirs = client.get(path, headers=b)
        missing = client.get(path.replace("versions/1", "versions/7"), headers=a)
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["detail"].replace(" 1", " 7") == missing.json()["detail"]
    # The API's own description is not handed to strangers when authentication is on.
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404, path
    assert TestClient(create_app(service)).get("/openapi.json").status_code == 200
    assert len(client.get(model_file, headers=a).content) == record.size_bytes
    assert client.get("/v1/sessions", headers=b).json() == {"sessions": []}
    assert len(client.get("/v1/sessions", headers=a).json()["sessions"]) == 1
    # Without security the API is open and says so.
    assert TestClient(create_app(service)).get("/healthz").json()["auth"] == "off"


def test_insecure_mode_says_so_loudly(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO)
    CloudSecurity(None, DeviceRegistry.in_state_dir(tmp_path)).announce()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("INSECURE" in m and "plaintext" in m for m in warnings)
    assert any("INSECURE" in m and "authentication is OFF" in m for m in warnings)


def test_edge_credential_options(tmp_path: Path) -> None:
    file = tmp_path / "credential"
    file.write_text("secret-token-123\n")
    assert read_credential(None, file) == "secret-token-123"
    with pytest.raises(SplitKDError, match="not both"):
        read_credential("x", file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SplitKDError, match="is empty"):
        read_credential(None, tmp_path / "empty")
    security = EdgeSecurity(credential="secret-token-123")
    assert "secret-token-123" not in repr(security)
    assert security.call_metadata("edge-a") == (
        ("x-splitkd-device", "edge-a"),
        ("authorization", "Bearer secret-token-123"),
    )
    assert EdgeSecurity().call_metadata("edge-a") == ()


# --- The real cloud process: HTTPS, mTLS, enrolled edge end to end ------------------------


def https_get(url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        body: bytes = response.read()
        return body


@pytest.mark.slow
def test_real_cloud_over_https_and_mutual_tls_with_an_enrolled_edge(
    certs: Path, tmp_path: Path
) -> None:
    import time

    from cloud_service.teacher import train_teacher
    from splitkd.hyper import Hyperparameters

    teacher = train_teacher("digits", hyper=Hyperparameters(epochs=2, learning_rate=0.001))
    teacher.save(tmp_path / "teacher.safetensors")
    state = tmp_path / "cloud"
    credential_file = tmp_path / "edge-a.credential"
    enrolled = cloud_cli(
        "devices",
        "add",
        "edge-a",
        "--state-dir",
        str(state),
        "--credential-file",
        str(credential_file),
    )
    assert enrolled.returncode == 0, enrolled.stderr
    credential = credential_file.read_text().strip()
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPLITKD_LOG_LEVEL": "DEBUG"}
    log_path = tmp_path / "cloud.log"
    cloud = subprocess.Popen(
        [sys.executable, "-m", "cloud_service.cli", "serve", "--host", "127.0.0.1",
         "--grpc-port", str(grpc_port), "--http-port", str(http_port),
         "--teacher", str(tmp_path / "teacher.safetensors"), "--state-dir", str(state),
         "--epochs", "1", "--tls-cert", str(certs / "server.pem"),
         "--tls-key", str(certs / "server-key.pem"), "--tls-ca", str(certs / "ca.pem"),
         "--require-client-cert"],
        env=env, cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    context = ClientTLS(ca=certs / "ca.pem").ssl_context()
    base = f"https://127.0.0.1:{http_port}"
    metrics = ""
    try:
        deadline = time.monotonic() + 120
        while True:
            assert cloud.poll() is None, log_path.read_text()
            try:
                health = json.loads(https_get(f"{base}/healthz", context))
                break
            except (OSError, ValueError):
                assert time.monotonic() < deadline, "the cloud never answered over HTTPS"
                time.sleep(0.3)
        assert health["status"] == "ok" and health["auth"] == "on" and health["tls"] == "mutual"
        # Plain HTTP on the HTTPS port gets no answer.
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5)

        edge_common = [
            "--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "device-edge-a.pem"),
            "--tls-key", str(certs / "device-edge-a-key.pem"), "--model-dir", str(tmp_path / "models"),
        ]  # fmt: skip
        edge_env = {**os.environ, "SPLITKD_LOG_LEVEL": "WARNING"}
        trained = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "train", "--cloud", f"127.0.0.1:{grpc_port}",
             "--data", "digits", "--shard", "0/2", "--device-id", "edge-a", "--no-progress",
             "--no-plots", "--report", str(tmp_path / "report.json"),
             "--checkpoint-dir", str(tmp_path / "edge-checkpoints"),
             "--credential-file", str(credential_file), *edge_common],
            env=edge_env, cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert json.loads((tmp_path / "report.json").read_text())["student"]["name"] == (
            "student-edge-a"
        )
        # The edge with a certificate but no credential is refused, with a way out.
        stranger = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "pull", "--cloud-http", base,
             "--model", "student-edge-a", "--device-id", "edge-a", *edge_common],
            env=edge_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert stranger.returncode != 0 and "HTTP 401" in stranger.stderr
        pulled = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "pull", "--cloud-http", base,
             "--model", "student-edge-a", "--device-id", "edge-a",
             "--credential-file", str(credential_file), *edge_common],
            env=edge_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr
        metrics = https_get(f"{base}/metrics", context).decode()
        assert 'splitkd_cloud_auth_refusals_total{reason="missing"} 1.0' in metrics
    finally:
        cloud.terminate()
        cloud.wait(30)
    cloud_log = log_path.read_text()
    assert "cloud ready" in cloud_log and "INSECURE" not in cloud_log
    assert credential not in cloud_log and credential not in metrics
    assert credential not in trained.stderr + trained.stdout


@pytest.mark.slow
def test_edge_serve_answers_over_https(certs: Path, tmp_path: Path) -> None:
    import time

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "serve", "--http-port", str(port),
         "--model-dir", str(tmp_path / "models"), "--tls-cert", str(certs / "server.pem"),
         "--tls-key", str(certs / "server-key.pem")],
        cwd=ROOT, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    context = ClientTLS(ca=certs / "ca.pem").ssl_context()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                https_get(f"https://127.0.0.1:{port}/healthz", context)
            except urllib.error.HTTPError as exc:  # 503: no model yet, answered over HTTPS
                status, health = exc.code, json.loads(exc.read())
                break
            except (OSError, ValueError):
                assert time.monotonic() < deadline, "the edge never answered over HTTPS"
                time.sleep(0.2)
        assert status == 503 and health["status"] == "no-model"
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        server.terminate()
        server.wait(10)


# --- Nothing is ever unpickled ------------------------------------------------------------

_PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "joblib"}
_SOURCE_DIRS = (
    "splitkd",
    "cloud_service",
    "edge_agent",
    "tests",
    "scripts",
    "benchmarks",
    "testbed",
)


def unpickling_sites(source: str, filename: str = "<string>") -> list[str]:
    """Every place in ``source`` that could unpickle: imports of pickling modules,
    ``torch.load`` without ``weights_only=True``, ``allow_pickle=True``, ``read_pickle``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in _PICKLING_MODULES
            ]
        elif (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[0] in _PICKLING_MODULES
        ):
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            weights_only = keywords.get("weights_only")
            if name.endswith("torch.load") and not (
                isinstance(weights_only, ast.Constant) and weights_only.value is True
            ):
                found.append(f"{where} {name}() without weights_only=True")
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} allow_pickle={ast.unparse(allow)}")
            if name.endswith(("read_pickle", "pickle.load", "pickle.loads")):
                found.append(f"{where} {name}()")
    return found


def test_the_checker_finds_unpickling() -> None:
    bad = (
        "import pickle\nfrom joblib import load\nimport torch\nimport numpy as np\n"
        "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n"
        "np.load('x.npy', allow_pickle=True)\nimport pandas as pd\npd.read_pickle('x')\n"
    )
    assert len(unpickling_sites(bad)) == 6
    good = "import torch\nimport numpy as np\ntorch.load('m', weights_only=True)\nnp.load('x', allow_pickle=False)\n"
    assert unpickling_sites(good) == []


def test_nothing_in_the_code_base_unpickles() -> None:
    files = [
        p for d in _SOURCE_DIRS if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))
    ]
    assert len(files) > 40
    found = [
        site for p in files for site in unpickling_sites(p.read_text(), str(p.relative_to(ROOT)))
    ]
    assert found == []
    # Shell scripts, Dockerfiles and configs: no inline Python that unpickles either.
    pattern = re.compile(r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|read_pickle")
    suffixes = {".sh", ".yml", ".yaml", ".toml", ".cfg"}
    others = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [
            d for d in subfolders if not d.startswith(".") and d not in {"build", "runs"}
        ]
        others += [
            Path(folder, n)
            for n in names
            if Path(n).suffix in suffixes or n.startswith("Dockerfile")
        ]
    assert len(others) > 3
    assert [str(p) for p in others if pattern.search(p.read_text(errors="replace"))] == []
