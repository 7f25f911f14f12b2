"""The testbed: the link emulator on loopback (no root), and the whole job across a real,
shaped network of namespaces (root), including its teardown after failures and kills."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import echo, netns
from testbed.linkemu import Delay, LinkEmulator, link_profile
from testbed.run import command

REPO = Path(__file__).resolve().parents[1]

# -- the link emulator: real sockets on loopback, no root ----------------------


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server on loopback that echoes until the client half-closes."""
    with echo.echo_server() as address:
        yield address


def _echo_all(sock: socket.socket, payload: bytes, pieces: list[int] | None = None) -> bytes:
    """Send ``payload`` (in ``pieces`` when given), half-close, and read the echo to EOF."""

    def send() -> None:
        offset = 0
        for size in pieces or [len(payload)]:
            sock.sendall(payload[offset : offset + size])
            offset += size
            if pieces:
                time.sleep(0.0005)  # separate reads, so separate delay draws
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    received = bytearray()
    while data := sock.recv(1 << 20):
        received += data
    sender.join()
    return bytes(received)


def test_emulator_adds_at_least_the_configured_delay(echo_server: tuple[str, int]) -> None:
    delay = Delay.from_ms(30.0)
    with (
        LinkEmulator(("127.0.0.1", 0), echo_server, delay, delay) as emulator,
        echo.connect(emulator.port) as sock,
    ):
        echo.round_trip(sock)  # the first one also pays the emulated handshake
        rtts = [echo.round_trip(sock) for _ in range(10)]
    # One way each direction: a round trip is at least 2 x 30 ms, however fast the machine.
    # How little more it is depends on the machine's load: `make bench` prints that ratio.
    assert min(rtts) >= 0.060


def test_emulator_preserves_bytes_and_order_under_jitter(echo_server: tuple[str, int]) -> None:
    rng = random.Random(3)
    payload = rng.randbytes(2_000_000)
    pieces = [rng.randint(1, 9000) for _ in range(400)]
    pieces.append(len(payload) - sum(pieces))
    # Jitter as large as the latency: netem would reorder packets here; a
    # byte stream must come out exactly as it went in.
    delay = Delay.from_ms(3.0, 3.0)
    with LinkEmulator(("127.0.0.1", 0), echo_server, delay, delay, seed=1) as emulator:
        with echo.connect(emulator.port) as sock:
            echoed = _echo_all(sock, payload, pieces)
        counters = emulator.counters
    assert echoed == payload
    assert counters.bytes_forward == counters.bytes_backward == len(payload)


def test_emulator_keeps_throughput(echo_server: tuple[str, int]) -> None:
    payload = os.urandom(16_000_000)
    delay = Delay.from_ms(50.0)
    with (
        LinkEmulator(("127.0.0.1", 0), echo_server, delay, delay) as emulator,
        echo.connect(emulator.port) as sock,
    ):
        echoed = _echo_all(sock, payload)
        held = emulator.counters.max_held_chunks
    assert echoed == payload
    # Stop-and-wait per 64 KiB chunk (16e6 / 65536 x 100 ms = 24 s) would never hold
    # more than the chunk it waits on; a delay line reads on while earlier chunks wait
    # out their delay. `make bench` prints the time against the stop-and-wait bound.
    assert held >= 4, f"the emulator held at most {held} chunk(s) at once: stop-and-wait"


def test_emulator_refuses_nothing_when_upstream_is_down() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead = placeholder.getsockname()[:2]
    with (
        LinkEmulator(("127.0.0.1", 0), dead, Delay(0.0), Delay(0.0)) as emulator,
        echo.connect(emulator.port) as sock,
    ):
        # The emulator closes the client's connection: EOF, not a hang.
        assert sock.recv(1) == b""


def test_link_profiles_and_shaping_arguments() -> None:
    lte = link_profile("lte")
    assert lte["latency_ms"] > link_profile("ethernet")["latency_ms"]
    with pytest.raises(ValueError, match="unknown link profile"):
        link_profile("carrier-pigeon")
    args = netns.tbf_args(6e6)
    assert args[:3] == ["tbf", "rate", "6000000bit"]
    burst = int(args[args.index("burst") + 1])
    assert burst >= 2 * netns.MTU_BYTES
    assert int(args[args.index("limit") + 1]) >= 64 * 1024
    with pytest.raises(netns.NetnsError):
        netns.check_prefix("a-prefix-far-too-long")
    assert command("x", "serve", model_dir=Path("m"), http_port=1) == [
        "x",
        "serve",
        "--model-dir",
        "m",
        "--http-port",
        "1",
    ]


def test_testbed_says_why_it_cannot_run_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = netns.available()
    assert reason is not None and "root" in reason
    script = (
        "import os, sys; os.geteuid = lambda: 1000; "
        "from testbed.run import main; sys.exit(main(['--out', '/nonexistent']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "needs root" in done.stderr


# -- the whole job across namespaces: root ----------------------------------------

TEST_EPOCHS = 4  # 36 steps per edge: the LTE edge's ~130 ms a step is most of the run
TEACHER_EPOCHS = 12


@pytest.fixture(scope="module")
def can_build() -> None:
    reason = netns.available()
    if reason is not None:
        pytest.skip(f"testbed {reason}")


@pytest.fixture(scope="module")
def teacher(request: pytest.FixtureRequest, can_build: None) -> Path:
    """A small teacher, kept across sessions in pytest's cache: training it is most of a
    cold run, and the testbed is about the network, not about the teacher's last point."""
    path = Path(request.config.cache.mkdir("splitkd-testbed")) / "teacher-digits.safetensors"
    if not path.is_file():
        from cloud_service.teacher import TEACHER_HYPER, train_teacher

        train_teacher("digits", hyper=TEACHER_HYPER.with_epochs(TEACHER_EPOCHS)).save(path)
    return path


def _prefix(tag: str) -> str:
    return f"skdt{os.getpid() % 10000}{tag}"


def _testbed(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed.run", *args]


@dataclass
class Run:
    prefix: str
    process: subprocess.CompletedProcess[str]
    report: dict[str, Any]

    def edge(self, link: str) -> dict[str, Any]:
        return next(e for e in self.report["edges"] if e["link_profile"] == link)


@pytest.fixture(scope="module")
def testbed_run(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Run:
    out = tmp_path_factory.mktemp("testbed")
    prefix = _prefix("a")
    done = subprocess.run(
        _testbed(
            *("--out", str(out), "--prefix", prefix, "--epochs", str(TEST_EPOCHS)),
            *("--teacher", str(teacher)),
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return Run(prefix, done, json.loads((out / "report.json").read_text()))


@pytest.mark.root
@pytest.mark.slow
def test_every_edge_trains_deploys_and_serves(testbed_run: Run) -> None:
    edges = testbed_run.report["edges"]
    assert {e["link_profile"] for e in edges} >= {"ethernet", "lte"}
    assert len({e["namespace"] for e in edges}) == len(edges) >= 3
    for edge in edges:
        assert edge["accuracy"] > 0.5, edge["device_id"]
        assert edge["steps"] > 0
    inference = testbed_run.report["inference"]
    assert inference["status"] == 200
    assert inference["samples"] == len(inference["predicted"]) > 0
    assert inference["correct"] >= inference["samples"] // 2


@pytest.mark.root
@pytest.mark.slow
def test_the_slow_link_is_measurably_slower(testbed_run: Run) -> None:
    ethernet = testbed_run.edge("ethernet")
    slow = max(testbed_run.report["edges"], key=lambda e: e["link"]["latency_ms"])
    fast_seconds = ethernet["network_seconds_per_step_mean"]
    slow_seconds = slow["network_seconds_per_step_mean"]
    assert slow_seconds > 2 * fast_seconds, (slow_seconds, fast_seconds)
    # A step is a request and a reply: at least one round trip of the link.
    assert slow_seconds >= 2 * slow["link"]["latency_ms"] / 1e3
    assert slow["throughput_bytes_per_second"] < ethernet["throughput_bytes_per_second"] / 2
    for edge in testbed_run.report["edges"]:
        # No edge beats what its shaped link allows (10% for timer slack).
        assert edge["network_seconds_per_step_mean"] >= 0.9 * edge["link_floor_seconds_per_step"]


@pytest.mark.root
@pytest.mark.slow
def test_bytes_per_step_do_not_depend_on_the_link(testbed_run: Run) -> None:
    totals = [e["bytes_per_step"]["total"] for e in testbed_run.report["edges"]]
    assert max(totals) <= 1.01 * min(totals), totals
    assert min(totals) > 0


@pytest.mark.root
@pytest.mark.slow
def test_nothing_is_left_behind_after_a_run(testbed_run: Run) -> None:
    assert testbed_run.report["teardown"]["leftovers"] == []
    assert len(testbed_run.report["teardown"]["removed"]) == len(testbed_run.report["edges"]) + 2
    assert netns.leftovers(testbed_run.prefix) == []


@pytest.mark.root
@pytest.mark.slow
def test_a_failed_run_is_torn_down(tmp_path: Path, teacher: Path) -> None:
    prefix = _prefix("f")
    done = subprocess.run(
        _testbed(
            *("--out", str(tmp_path), "--prefix", prefix, "--epochs", "1"),
            *("--teacher", str(teacher), "--data", "npz:/nonexistent/edge-data.npz"),
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    # The network and the cloud were up; every edge failed on its data.
    assert done.returncode == 1
    assert "testbed failed" in done.stderr and "edge-data.npz" in done.stderr
    assert "nothing left behind" in done.stderr
    assert netns.leftovers(prefix) == []
    assert not (tmp_path / "report.json").exists()


def _start_and_wait_for(role: str, out: Path, prefix: str, teacher: Path) -> subprocess.Popen[str]:
    """A testbed run, once a process runs in the namespace of ``role`` (c: cloud, e0: edge 0)."""
    process = subprocess.Popen(
        _testbed("--out", str(out), "--prefix", prefix, "--teacher", str(teacher)),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the testbed exited early: {process.stderr.read() if process.stderr else ''}"
            )
        if netns.pids(f"{prefix}-{role}"):
            return process
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the testbed started nothing in {prefix}-{role} within 90 s")


@pytest.mark.root
@pytest.mark.slow
def test_sigterm_tears_everything_down(tmp_path: Path, teacher: Path) -> None:
    prefix = _prefix("t")
    process = _start_and_wait_for("e0", tmp_path, prefix, teacher)  # edges are training
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "nothing left behind" in err
    assert netns.leftovers(prefix) == []


@pytest.mark.root
@pytest.mark.slow
def test_cleanup_removes_what_a_killed_run_left(tmp_path: Path, teacher: Path) -> None:
    prefix = _prefix("k")
    process = _start_and_wait_for("c", tmp_path, prefix, teacher)
    process.kill()  # no chance to tear down: namespaces stay behind
    process.communicate(timeout=30)
    assert netns.namespaces(prefix)
    done = subprocess.run(
        _testbed("--cleanup", "--prefix", prefix),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"{prefix}-c" in done.stdout
    assert netns.leftovers(prefix) == []
