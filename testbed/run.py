"""``make testbed``: the whole split-KD job across a real, shaped network on one machine.

Builds one network namespace for the cloud and one per edge, joined by veth
pairs through a bridge (``testbed.netns``); shapes each edge's bandwidth with
``tc tbf`` and adds its one-way latency and jitter with a user-space link
emulator (``testbed.linkemu``; this kernel has no ``netem``). Then it starts
``splitkd-cloud serve`` in the cloud's namespace and ``splitkd-edge train`` in
each edge's, waits for training, export and download, starts
``splitkd-edge serve`` in one edge and sends it a real ``/v1/predict`` from
the cloud's namespace, and writes ``runs/testbed/report.json`` with each
edge's measured step latency, throughput and bytes per step next to what its
link profile allows. The network is always torn down: on success, on error,
on SIGINT/SIGTERM/SIGHUP and at interpreter exit. ``--cleanup`` removes what a
killed run left behind. Needs root.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

from splitkd import outdir
from splitkd.errors import SplitKDError
from testbed import netns
from testbed.linkemu import link_profile

log = logging.getLogger("testbed")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EDGES = ("laptop-x86/ethernet", "raspberry-pi-4/wifi", "raspberry-pi-4/lte")
# Inside the cloud's namespace the services listen on loopback only: the one
# way in from the network is each edge's link emulator on the cloud's address.
CLOUD_GRPC_PORT = 50051
CLOUD_HTTP_PORT = 8000
EMULATOR_BASE_PORT = 50100  # edge i's emulator listens on 50100 + i
EDGE_HTTP_PORT = 8001  # splitkd-edge serve, loopback inside the edge
EDGE_PUBLIC_PORT = 8080  # the edge's link emulator in front of it
PREDICT_SAMPLES = 8
_PR_SET_PDEATHSIG = 1

# Small probes run *inside* a namespace with `ip netns exec … python -c`: this
# process stays in the host's namespace, which has no route to 10.77.0.0/24.
_WAIT_READY = r"""
import socket, sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
urls = [u for u in sys.argv[2].split(",") if u]
ports = [p for p in sys.argv[3].split(",") if p]
while urls or ports:
    if time.monotonic() > deadline:
        sys.exit("not ready: " + ", ".join(urls + ports))
    for url in list(urls):
        try:
            urllib.request.urlopen(url, timeout=2).read()
            urls.remove(url)
        except OSError:
            pass
    # Ports after URLs: the cloud's HTTP answers only once its gRPC server is up.
    for port in [] if urls else list(ports):
        host, number = port.rsplit(":", 1)
        try:
            socket.create_connection((host, int(number)), timeout=2).close()
            ports.remove(port)
        except OSError:
            pass
    time.sleep(0.3)
"""
_PREDICT = r"""
import json, sys, time, urllib.request
url, times, body = sys.argv[1], int(sys.argv[2]), sys.stdin.buffer.read()
out = []
for _ in range(times):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
        out.append({"status": response.status, "seconds": time.perf_counter() - started,
                    "response": payload})
print(json.dumps(out))
"""


class TestbedError(RuntimeError):
    pass


@dataclass
class EdgePlan:
    index: int
    device: str
    link: str
    profile: dict[str, Any]

    @property
    def role(self) -> str:
        return f"e{self.index}"

    @property
    def device_id(self) -> str:
        return f"edge{self.index}-{self.link}"

    @property
    def shaping(self) -> netns.Shaping:
        rates = self.profile["bandwidth_mbps"]
        return netns.Shaping.from_mbps(float(rates["up"]), float(rates["down"]))


def parse_edge(index: int, text: str) -> EdgePlan:
    device, sep, link = text.partition("/")
    if not sep or not device or not link:
        raise TestbedError(f"--edge {text!r}: expected DEVICE/LINK, e.g. raspberry-pi-4/lte")
    text = resources.files("splitkd").joinpath("profiles", "devices.json").read_text()
    devices = json.loads(text)["devices"]
    if device not in devices:
        raise TestbedError(f"unknown device profile {device!r}; known: {', '.join(devices)}")
    try:
        profile = link_profile(link)
    except ValueError as exc:
        raise TestbedError(str(exc)) from None
    return EdgePlan(index, device, link, profile)


def _die_with_parent() -> None:
    # If this orchestrator is killed outright (SIGKILL), its children get
    # SIGTERM from the kernel instead of training on in orphaned namespaces.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Testbed:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.logs = self.out / "logs"
        self.edges = [parse_edge(i, text) for i, text in enumerate(args.edge or DEFAULT_EDGES)]
        if not 1 <= len(self.edges) <= 50:
            raise TestbedError("between 1 and 50 edges")
        if not -len(self.edges) <= args.serve_edge < len(self.edges):
            raise TestbedError(f"--serve-edge {args.serve_edge}: there are {len(self.edges)} edges")
        if args.epochs < 1:
            raise TestbedError("--epochs must be at least 1")
        self.network = netns.Network(args.prefix, args.subnet)
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._log_files: list[IO[bytes]] = []
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.python = sys.executable
        self.removed: list[str] = []
        self._torn_down = False

    # -- processes ---------------------------------------------------------

    def start(
        self, name: str, host: netns.Host, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_file = (self.logs / f"{name}.log").open("wb")
        self._log_files.append(log_file)
        process = subprocess.Popen(
            host.exec(argv),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            cwd=REPO,
            # Own session: a Ctrl-C in the terminal reaches this orchestrator
            # only, which then stops everything in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.processes.append((name, process))
        log.debug("started %s (pid %d) in %s", name, process.pid, host.namespace)
        return process

    def start_emulator(
        self, name: str, host: netns.Host, listen: str, connect: str, edge: EdgePlan
    ) -> tuple[str, subprocess.Popen[bytes]]:
        """A link emulator with ``edge``'s latency and jitter, inside ``host``."""
        argv = command(
            self.python,
            "-m",
            "testbed.linkemu",
            listen=listen,
            connect=connect,
            profile=edge.link,
            seed=edge.index,
        )
        return name, self.start(name, host, argv)

    def probe(
        self, host: netns.Host, script: str, args: list[str], stdin: bytes | None, timeout: float
    ) -> str:
        """Run a probe script inside ``host``'s namespace; its stdout."""
        done = subprocess.run(
            host.exec([self.python, "-c", script, *args]),
            input=stdin,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise TestbedError(
                f"probe in {host.namespace} failed: {done.stderr.decode(errors='replace').strip()}"
            )
        return done.stdout.decode()

    def wait_ready(
        self,
        host: netns.Host,
        urls: list[str],
        ports: list[str],
        watch: list[tuple[str, subprocess.Popen[bytes]]],
        timeout: float,
    ) -> None:
        """Poll from inside ``host`` until URLs answer and ports accept; fail early if
        a watched process exits."""
        waiter = subprocess.Popen(
            host.exec(
                [self.python, "-c", _WAIT_READY, str(timeout), ",".join(urls), ",".join(ports)]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            while waiter.poll() is None:
                for name, process in watch:
                    if process.poll() is not None:
                        raise TestbedError(
                            f"{name} exited with code {process.returncode} while starting:\n"
                            + self.tail(name)
                        )
                time.sleep(0.2)
        finally:
            if waiter.poll() is None:
                waiter.kill()
            _, err = waiter.communicate()
        if waiter.returncode != 0:
            raise TestbedError(f"{', '.join(n for n, _ in watch)}: {err.decode().strip()}")

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"  (no log at {path})"
        return "\n".join(f"  | {line}" for line in text) + f"\n  (full log: {path})"

    # -- the run -----------------------------------------------------------

    def start_cloud(
        self, cloud: netns.Host, teacher: Path
    ) -> list[tuple[str, subprocess.Popen[bytes]]]:
        """The cloud in its namespace and a link emulator per edge, once all answer."""
        cloud_process = self.start(
            "cloud",
            cloud,
            command(
                self.python,
                "-m",
                "cloud_service.cli",
                "serve",
                host="127.0.0.1",
                grpc_port=CLOUD_GRPC_PORT,
                http_port=CLOUD_HTTP_PORT,
                teacher=teacher,
                state_dir=self.out / "cloud",
                epochs=self.args.epochs,
            ),
        )
        emulators = [
            self.start_emulator(
                f"linkemu-{edge.role}",
                cloud,
                f"{cloud.address}:{EMULATOR_BASE_PORT + edge.index}",
                f"127.0.0.1:{CLOUD_GRPC_PORT}",
                edge,
            )
            for edge in self.edges
        ]
        self.wait_ready(
            cloud,
            [f"http://127.0.0.1:{CLOUD_HTTP_PORT}/healthz"],
            [f"{cloud.address}:{EMULATOR_BASE_PORT + e.index}" for e in self.edges],
            [("cloud", cloud_process), *emulators],
            timeout=self.args.startup_timeout,
        )
        return [("cloud", cloud_process), *emulators]

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self._clean_outputs()
        teacher = self._teacher()
        log.info(
            "network %s: bridge in namespace %s, %s.0/24",
            self.network.prefix,
            self.network.switch,
            self.args.subnet,
        )
        self.network.build()
        cloud = self.network.add_host(netns.CLOUD_ROLE)
        hosts = {}
        for edge in self.edges:
            hosts[edge.index] = self.network.add_host(edge.role, edge.shaping)
            rates = edge.profile["bandwidth_mbps"]
            log.info(
                "  %-6s %-12s %-16s %-9s up %g / down %g Mbit/s (tbf), %g±%g ms one way (linkemu)",
                edge.role,
                hosts[edge.index].address,
                edge.device,
                edge.link,
                rates["up"],
                rates["down"],
                edge.profile["latency_ms"],
                edge.profile["jitter_ms"],
            )

        log.info("cloud: starting in %s (%s), teacher %s", cloud.namespace, cloud.address, teacher)
        cloud_started = time.monotonic()
        services = self.start_cloud(cloud, teacher)
        health = json.loads(
            self.probe(
                cloud,
                "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())",
                [f"http://127.0.0.1:{CLOUD_HTTP_PORT}/healthz"],
                None,
                30,
            )
        )
        log.info("cloud ready after %.1f s", time.monotonic() - cloud_started)

        trained = self._train(cloud, hosts, services, started)
        inference = self._serve_and_predict(cloud, hosts)
        report = {
            "prefix": self.network.prefix,
            "subnet": f"{self.args.subnet}.0/24",
            "data": self.args.data,
            "epochs": self.args.epochs,
            "cloud": {
                "namespace": cloud.namespace,
                "address": cloud.address,
                "teacher": health.get("teacher"),
            },
            "edges": [
                summarize(edge, hosts[edge.index], trained[edge.index]) for edge in self.edges
            ],
            "inference": inference,
            "qdiscs": self.network.qdiscs(),
            "wall_seconds": time.monotonic() - started,
            "logs": str(self.logs),
        }
        return report

    def _clean_outputs(self) -> None:
        """The last run's outputs go; a --out folder splitkd did not make is refused."""
        outdir.claim(self.out, "the testbed")
        for path in [*self.out.glob("edge*"), self.out / "logs", self.out / "cloud"]:
            outdir.clear(path, owner=self.out)
        outdir.clear(self.out / "report.json", owner=self.out)

    def _teacher(self) -> Path:
        """The teacher checkpoint: cached, because training it is most of a cold run."""
        if self.args.teacher is not None:
            path = Path(self.args.teacher)
        else:
            slug = "".join(c if c.isalnum() else "-" for c in self.args.teacher_data)
            path = self.out / f"teacher-{slug}-e{self.args.teacher_epochs}.safetensors"
        if path.is_file():
            return path
        log.info(
            "teacher: training on %s for %d epochs (once; cached at %s)",
            self.args.teacher_data,
            self.args.teacher_epochs,
            path,
        )
        import torch

        from cloud_service.teacher import TEACHER_HYPER, train_teacher

        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        hyper = TEACHER_HYPER.with_epochs(self.args.teacher_epochs)
        teacher = train_teacher(self.args.teacher_data, hyper=hyper)
        teacher.save(path)
        log.info("teacher accuracy on its held-out split: %.4f", teacher.accuracy or 0.0)
        return path

    def _edge_flags(self) -> list[str]:
        """Optional flags only when this checkout's edge CLI has them."""
        done = subprocess.run(
            [self.python, "-m", "edge_agent.cli", "train", "--help"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
            check=False,
        )
        # Plots cost seconds of matplotlib per edge and nothing here looks at them.
        return ["--no-plots"] if "--no-plots" in done.stdout else []

    def _train(
        self,
        cloud: netns.Host,
        hosts: dict[int, netns.Host],
        services: list[tuple[str, subprocess.Popen[bytes]]],
        started: float,
    ) -> dict[int, dict[str, Any]]:
        flags = self._edge_flags()
        count = len(self.edges)
        running: dict[int, subprocess.Popen[bytes]] = {}
        for edge in self.edges:
            running[edge.index] = self.start(
                edge.device_id,
                hosts[edge.index],
                command(
                    self.python,
                    "-m",
                    "edge_agent.cli",
                    "train",
                    "--no-progress",
                    *flags,
                    cloud=f"{cloud.address}:{EMULATOR_BASE_PORT + edge.index}",
                    data=self.args.data,
                    shard=f"{edge.index}/{count}",
                    device_id=edge.device_id,
                    epochs=self.args.epochs,
                    report=self.out / f"{edge.device_id}.json",
                    model_dir=self.out / edge.device_id / "models",
                    device_profile=edge.device,
                    link_profile=edge.link,
                ),
                # Checkpoints of this run stay in this run's folder, not in root's
                # ~/.local/state, where a killed run's would be resumed next time.
                env={"SPLITKD_CHECKPOINT_DIR": str(self.out / edge.device_id / "checkpoints")},
            )
        log.info("%d edges: split KD across their links (raw data stays in each namespace)", count)
        training_started = time.monotonic()
        deadline = started + self.args.timeout
        reports: dict[int, dict[str, Any]] = {}
        while len(reports) < count:
            if time.monotonic() > deadline:
                raise TestbedError(f"the run took longer than --timeout {self.args.timeout:.0f} s")
            for name, process in services:
                if process.poll() is not None:
                    raise TestbedError(
                        f"{name} exited with code {process.returncode} during training:\n"
                        + self.tail(name)
                    )
            for edge in self.edges:
                process = running[edge.index]
                if edge.index in reports or process.poll() is None:
                    continue
                if process.returncode != 0:
                    raise TestbedError(
                        f"{edge.device_id} exited with code {process.returncode}:\n"
                        + self.tail(edge.device_id)
                    )
                report = json.loads((self.out / f"{edge.device_id}.json").read_text())
                reports[edge.index] = report
                log.info(
                    "  %s done after %.1f s: %d steps, accuracy %.4f",
                    edge.device_id,
                    time.monotonic() - training_started,
                    report["steps"],
                    report["student"]["accuracy"],
                )
            time.sleep(0.2)
        return reports

    def _serve_and_predict(self, cloud: netns.Host, hosts: dict[int, netns.Host]) -> dict[str, Any]:
        edge = self.edges[self.args.serve_edge]
        host = hosts[edge.index]
        serve_name = f"serve-{edge.device_id}"
        serve = self.start(
            serve_name,
            host,
            command(
                self.python,
                "-m",
                "edge_agent.cli",
                "serve",
                host="127.0.0.1",
                http_port=EDGE_HTTP_PORT,
                model_dir=self.out / edge.device_id / "models",
            ),
        )
        emulator = self.start_emulator(
            f"linkemu-serve-{edge.role}",
            host,
            f"{host.address}:{EDGE_PUBLIC_PORT}",
            f"127.0.0.1:{EDGE_HTTP_PORT}",
            edge,
        )
        base = f"http://{host.address}:{EDGE_PUBLIC_PORT}"
        # The probe runs in the cloud's namespace: the request crosses the
        # bridge, the edge's shaped downlink, its emulated latency, and back.
        self.wait_ready(
            cloud,
            [f"{base}/healthz"],
            [],
            [(serve_name, serve), emulator],
            timeout=self.args.startup_timeout,
        )
        samples, labels = _heldout_samples(self.args.data, edge.index, len(self.edges))
        body = json.dumps({"inputs": samples}).encode()
        answers = json.loads(self.probe(cloud, _PREDICT, [f"{base}/v1/predict", "2"], body, 120))
        last = answers[-1]
        predicted = [p["class"] for p in last["response"]["predictions"]]
        correct = sum(int(p == y) for p, y in zip(predicted, labels, strict=True))
        log.info(
            "inference: POST %s/v1/predict from %s: HTTP %d, %d/%d correct, %.1f ms (warm)",
            base,
            cloud.namespace,
            last["status"],
            correct,
            len(labels),
            last["seconds"] * 1e3,
        )
        return {
            "edge": edge.device_id,
            "url": f"{base}/v1/predict",
            "from_namespace": cloud.namespace,
            "status": last["status"],
            "model": last["response"]["model"],
            "samples": len(labels),
            "correct": correct,
            "predicted": predicted,
            "labels": labels,
            "seconds_first": answers[0]["seconds"],
            "seconds_warm": last["seconds"],
            "server_seconds": last["response"].get("seconds"),
        }

    # -- teardown ----------------------------------------------------------

    def teardown(self) -> list[str]:
        """Stop every process, remove every namespace; safe to call more than once."""
        if self._torn_down:
            return self.removed
        self._torn_down = True
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in _SIGNALS}
        try:
            for _, process in reversed(self.processes):
                if process.poll() is None:
                    process.terminate()
            deadline = time.monotonic() + 5
            for _, process in self.processes:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            # Also whatever those processes started, and leftovers by name.
            self.removed = self.network.teardown() or netns.cleanup(self.network.prefix)
            for handle in self._log_files:
                handle.close()
            left = netns.leftovers(self.network.prefix)
            if left:
                log.error("teardown left %s behind", ", ".join(left))
            else:
                log.info("teardown: removed %d namespaces, nothing left behind", len(self.removed))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.removed


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def command(*argv: object, **options: object) -> list[str]:
    """``command("x", "serve", model_dir=p)`` -> ``["x", "serve", "--model-dir", str(p)]``."""
    out = [str(a) for a in argv]
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def _heldout_samples(data: str, index: int, count: int) -> tuple[list[Any], list[int]]:
    """A few of the served edge's own held-out samples, to send to its API."""
    from splitkd.data import edge_split, load_dataset, parse_shard
    from splitkd.data.partition import default_presumed_fraction

    # The edges are started without --presumed-fraction: the same default split.
    split = edge_split(
        load_dataset(data),
        parse_shard(f"{index}/{count}"),
        presumed_fraction=default_presumed_fraction(data),
    )
    n = min(PREDICT_SAMPLES, len(split.heldout))
    return split.heldout.x[:n].tolist(), [int(y) for y in split.heldout.y[:n]]


def summarize(edge: EdgePlan, host: netns.Host, report: dict[str, Any]) -> dict[str, Any]:
    """One edge's link figures from its per-step history."""
    history = report["history"]
    batch_size = report["session"]["hyperparameters"]["batch_size"]
    # Bytes per step compare steady steps: full batches whose next batch is full
    # too (a step carries the next step's teacher activations ahead, so the step
    # before a short last batch of an epoch carries fewer), and not step 0 (it
    # carries its own teacher activations and the next step's). Shards differ
    # by a sample or so, so short batches differ between edges, links aside.
    # With the teacher-output cache only the first epoch carries the teacher's
    # side: steady means after it, when there is an after.
    later = any(h["epoch"] > 0 for h in history)
    full = [
        h
        for i, h in enumerate(history)
        if i > 0
        and (h["epoch"] > 0 or not later)
        and h["batch"] == batch_size
        and i + 1 < len(history)
        and history[i + 1]["batch"] == batch_size
    ] or history
    network = [h["network_seconds"] for h in history]
    up = statistics.fmean(h["bytes_up"] for h in full)
    down = statistics.fmean(h["bytes_down"] for h in full)
    rates = edge.profile["bandwidth_mbps"]
    latency = edge.profile["latency_ms"] / 1e3
    # What the link alone costs a step: a round trip plus both transfers at
    # the shaped rates; the measured time adds the cloud's compute and gRPC.
    floor = 2 * latency + up * 8 / (rates["up"] * 1e6) + down * 8 / (rates["down"] * 1e6)
    moved = sum(h["bytes_up"] + h["bytes_down"] for h in history)
    summary: dict[str, Any] = {
        "device_id": edge.device_id,
        "device_profile": edge.device,
        "link_profile": edge.link,
        "namespace": host.namespace,
        "address": host.address,
        "link": {
            "up_mbps": rates["up"],
            "down_mbps": rates["down"],
            "latency_ms": edge.profile["latency_ms"],
            "jitter_ms": edge.profile["jitter_ms"],
        },
        "steps": len(history),
        "accuracy": report["student"]["accuracy"],
        "network_seconds_per_step_mean": statistics.fmean(network),
        "network_seconds_per_step_median": statistics.median(network),
        "network_seconds_per_step_p95": _percentile(network, 0.95),
        "link_floor_seconds_per_step": floor,
        "step_seconds_mean": report["timing"]["step_seconds_mean"],
        "bytes_per_step": {"up": up, "down": down, "total": up + down},
        "throughput_bytes_per_second": moved / max(1e-9, sum(network)),
        "traffic": {
            "bytes_up": report["traffic"]["bytes_up"],
            "bytes_down": report["traffic"]["bytes_down"],
        },
        "wall_seconds": report["wall_seconds"],
        "student": {k: report["student"].get(k) for k in ("name", "version", "onnx_sha256")},
    }
    if "energy" in report:
        summary["energy"] = report["energy"]
    return summary


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(report: dict[str, Any]) -> str:
    head = (
        "edge",
        "device",
        "link",
        "steps",
        "net ms/step",
        "floor ms",
        "KB/step",
        "KB/s",
        "accuracy",
    )
    rows = [head]
    for e in report["edges"]:
        rows.append(
            (
                e["device_id"],
                e["device_profile"],
                e["link_profile"],
                str(e["steps"]),
                f"{e['network_seconds_per_step_mean'] * 1e3:.1f}",
                f"{e['link_floor_seconds_per_step'] * 1e3:.1f}",
                f"{e['bytes_per_step']['total'] / 1e3:.1f}",
                f"{e['throughput_bytes_per_second'] / 1e3:.0f}",
                f"{e['accuracy']:.4f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    inference = report["inference"]
    lines.append(
        f"\n  inference: {inference['url']} from {inference['from_namespace']}: "
        f"HTTP {inference['status']}, {inference['correct']}/{inference['samples']} correct, "
        f"{inference['seconds_warm'] * 1e3:.1f} ms round trip"
    )
    lines.append(f"  whole run: {report['wall_seconds']:.1f} s")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.run",
        description="Run split KD across a real, shaped network of namespaces on this machine "
        "(root). Writes OUT/report.json and tears the network down whatever happens.",
    )
    parser.add_argument(
        "--edge",
        action="append",
        metavar="DEVICE/LINK",
        help="an edge's device and link profile; repeat for each edge "
        f"(default: {' '.join(DEFAULT_EDGES)}). nb-iot moves ~100 KB per step at 62.5 kbit/s: "
        "about 15 s a step",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs per edge (default 10: about 0.9 accuracy)"
    )
    parser.add_argument("--data", default="digits", help="the edges' data spec (default digits)")
    parser.add_argument("--teacher-data", default="digits", help="the cloud's teacher data")
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="teacher checkpoint; trained and cached here when missing "
        "(default OUT/teacher-DATA-eN.safetensors)",
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=40, help="epochs when training the teacher"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/testbed"),
        help="output folder (default runs/testbed)",
    )
    parser.add_argument(
        "--prefix",
        default=None,
        help="name prefix of namespaces and interfaces (default skd<pid>)",
    )
    parser.add_argument("--subnet", default="10.77.0", help="first three octets (default 10.77.0)")
    parser.add_argument(
        "--serve-edge",
        type=int,
        default=-1,
        help="index of the edge that serves /v1/predict after training (default: the last)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=180.0, help="seconds for a service to get ready"
    )
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="only remove leftovers of killed runs (every skd<pid> whose process is gone, or "
        "exactly --prefix when given) and exit",
    )
    parser.add_argument("-v", "--verbose", action="count", default=1)
    parser.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose")
    return parser


def _cleanup(args: argparse.Namespace) -> int:
    prefixes = [netns.check_prefix(args.prefix)] if args.prefix else netns.stale_prefixes()
    removed = [name for prefix in prefixes for name in netns.cleanup(prefix)]
    sys.stdout.write(f"removed {len(removed)}: {' '.join(removed) or 'nothing'}\n")
    left = [name for prefix in prefixes for name in netns.leftovers(prefix)]
    return 1 if left else 0


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from splitkd.logs import configure

    args = _parser().parse_args(argv)
    configure(args.verbose)
    reason = netns.available()
    if reason is not None:
        log.error("cannot build a testbed: %s", reason)
        return 2
    if args.cleanup:
        try:
            return _cleanup(args)
        except netns.NetnsError as exc:
            log.error("%s", exc)
            return 2
    args.prefix = args.prefix or f"skd{os.getpid()}"
    try:
        bed = Testbed(args)
    except (TestbedError, netns.NetnsError) as exc:
        log.error("%s", exc)
        return 2
    atexit.register(bed.teardown)
    # SIGTERM and SIGHUP unwind like Ctrl-C, through the finally below.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        report = bed.run()
    except (
        TestbedError,
        SplitKDError,
        netns.NetnsError,
        OSError,
        subprocess.SubprocessError,
    ) as exc:
        log.error("testbed failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    finally:
        removed = bed.teardown()
    report["teardown"] = {
        "removed": removed,
        "leftovers": netns.leftovers(args.prefix),
    }
    path = args.out / "report.json"
    path.write_text(json.dumps(report, indent=2))
    sys.stdout.write(table(report) + f"\n  report: {path}\n")
    return 0 if not report["teardown"]["leftovers"] else 1


if __name__ == "__main__":
    sys.exit(main())
