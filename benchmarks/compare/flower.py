"""The Flower side: its own virtual environment, a server process, one client process per device."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.compare.processes import (
    Device,
    RunFailed,
    cleanup,
    start,
    wait_devices,
    wait_listening,
)
from benchmarks.compare.results import DeviceResult, SystemRun
from benchmarks.compare.scenarios import DeviceData, RunContext
from benchmarks.relay import CountingRelay
from splitkd.demo import free_port
from splitkd.models import zoo
from splitkd.training import accuracy_of, predict

FLOWER_VERSION = "1.42.*"
TORCH_VERSION = "2.13.0"
# The Flower venv's own pins: flwr brings its grpcio/protobuf, which must not touch ours.
REQUIREMENTS = [f"flwr=={FLOWER_VERSION}", "numpy"]
ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-flower"
TRANSPORT = "legacy flwr.server.start_server / flwr.client.start_client: gRPC bidirectional stream"


def ensure_venv(venv: Path = VENV) -> Path:
    """The Flower venv's python, creating and installing the venv when absent."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = " ".join([f"torch=={TORCH_VERSION}", *REQUIREMENTS])
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    base = shutil.which("python3.11") or sys.executable
    print(f"creating the Flower virtual environment {venv} ({wanted})…", flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # torch first, pinned: its CPU wheel; later requirements then never pull a CUDA build.
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    stamp.write_text(wanted)
    return python


def flower_version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import flwr; print(flwr.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        env={"FLWR_TELEMETRY_ENABLED": "0", "PATH": ""},
    )
    return done.stdout.strip()


def run_fedavg(ctx: RunContext, python: Path | None = None) -> SystemRun:
    """FedAvg over Flower's real network path on loopback, every client behind a relay."""
    python = python or ensure_venv()
    folder = ctx.folder / "flower-fedavg"
    folder.mkdir(parents=True, exist_ok=True)
    app = [str(python), "-m", "benchmarks.compare.flower_app"]
    spec = ["--family", ctx.student.family, "--spec", ctx.student.to_json()]
    env = {"PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    port = free_port()
    evaluate = ctx.options.get("flower_evaluate", "final")
    server_log = folder / "server.log"
    server_command = [
        *app,
        "server",
        *spec,
        "--port",
        str(port),
        "--clients",
        str(len(ctx.devices)),
    ]
    server_command += ["--rounds", str(ctx.rounds), "--seed", str(ctx.seed), "--evaluate", evaluate]
    server = start(server_command, server_log, env)
    devices: list[Device] = []
    with cleanup([server], devices):
        wait_listening(port, server, server_log, timeout=120)
        started = time.monotonic()
        hyper = json.dumps(asdict(ctx.hyper))
        for data in ctx.devices:
            relay = CountingRelay(port)
            log = folder / f"{data.name}.log"
            command = [*app, "client", *spec, "--server", f"127.0.0.1:{relay.port}"]
            command += ["--shard", str(data.path), "--hyper", hyper]
            command += ["--local-epochs", str(ctx.local_epochs), "--out", str(folder / data.name)]
            devices.append(Device(data.name, start(command, log, env), relay, log))
        ended = wait_devices(devices, [server], timeout=3600)
        results = [
            _device_result(ctx, folder, d, data)
            for d, data in zip(devices, ctx.devices, strict=True)
        ]
    return SystemRun(results, ended - started, {"transport": TRANSPORT, "evaluate": evaluate})


def _device_result(ctx: RunContext, folder: Path, device: Device, data: DeviceData) -> DeviceResult:
    report_path = folder / f"{device.name}.json"
    if not report_path.exists():
        raise RunFailed(f"{device.name} wrote no final report; see {device.log}")
    report = json.loads(report_path.read_text())
    model = zoo.build(ctx.student)
    with np.load(folder / f"{device.name}.npz", allow_pickle=False) as weights:
        model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
    union = accuracy_of(predict(model, ctx.union_x), ctx.union_y)
    up, down = device.relay.snapshot()
    return DeviceResult(
        device.name,
        data.shard,
        float(report["accuracy"]),
        union,
        up,
        down,
        len(device.relay.connections),
        data.device_class,
    )
