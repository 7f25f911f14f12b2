"""splitkd's side: ``splitkd-cloud serve`` and one ``splitkd-edge train`` per device, as the demo runs them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.compare.processes import Device, RunFailed, cleanup, start, wait_devices
from benchmarks.compare.results import DeviceResult, SystemRun
from benchmarks.compare.scenarios import DATA, DeviceData, RunContext
from benchmarks.relay import CountingRelay
from edge_agent.inference import Predictor
from splitkd.data import load_dataset
from splitkd.data.partition import DEMO_PRESUMED_FRACTION, cloud_split
from splitkd.demo import (
    DEMO_EVAL_EVERY,
    DEMO_STUDENT_CUT,
    DEMO_WIRE_CODEC,
    free_port,
    wait_healthy,
)

# make demo's wire for every split system: teacher outputs once per sample (the cache is on
# by default), int8 with stochastic rounding, the cut after the student's convolutions.
FRUGAL_WIRE = ["--wire-codec", DEMO_WIRE_CODEC, "--student-cut", str(DEMO_STUDENT_CUT)]


def teacher_file(folder: Path) -> Path:
    """The cloud's teacher, trained once per harness run: it depends on neither the seed nor the
    scenario (its own fixed hyperparameters, the cloud's presumed share), so every run shares it."""
    path = folder / "teacher.safetensors"
    if not path.exists():
        command = [sys.executable, "-m", "cloud_service.cli", "-q", "train-teacher"]
        log = folder / "teacher.log"
        process = start([*command, "--data", DATA, "--out", str(path)], log)
        if process.wait() != 0:
            raise RunFailed(f"training the teacher failed; see {log}")
    return path


def run_split_kd(ctx: RunContext) -> SystemRun:
    """Per-device split KD (each device its own session with the teacher), over gRPC."""
    return _run_processes(
        ctx,
        "splitkd-split-kd",
        ["--epochs", str(ctx.epochs)],
        [*FRUGAL_WIRE, "--eval-every", str(DEMO_EVAL_EVERY)],
        "splitkd gRPC (per-step activations and gradients; make demo's frugal wire)",
    )


def _run_processes(
    ctx: RunContext, name: str, cloud_flags: list[str], edge_flags: list[str], transport: str
) -> SystemRun:
    """One ``splitkd-cloud serve`` and one ``splitkd-edge train`` per device, each behind a relay."""
    folder = ctx.folder / name
    folder.mkdir(parents=True, exist_ok=True)
    teacher = teacher_file(ctx.folder.parent)
    grpc_port, http_port = free_port(), free_port()
    cloud_log = folder / "cloud.log"
    command = [sys.executable, "-m", "cloud_service.cli", "serve", "--host", "127.0.0.1"]
    command += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    command += ["--teacher", str(teacher), "--state-dir", str(folder / "cloud")]
    command += ["--seed", str(ctx.seed), *cloud_flags]
    cloud = start(command, cloud_log)
    devices: list[Device] = []
    with cleanup([cloud], devices):
        wait_healthy(f"http://127.0.0.1:{http_port}/healthz", cloud, cloud_log)
        started = time.monotonic()
        for data in ctx.devices:
            relay = CountingRelay(grpc_port)
            edge = _edge_command(ctx, folder, data, relay.port)
            log = folder / f"{data.name}.log"
            devices.append(Device(data.name, start([*edge, *edge_flags], log), relay, log))
        ended = wait_devices(devices, [cloud], timeout=3600)
        results = [
            _device_result(ctx, folder, d, data)
            for d, data in zip(devices, ctx.devices, strict=True)
        ]
    return SystemRun(results, ended - started, {"transport": transport})


def _edge_command(ctx: RunContext, folder: Path, data: DeviceData, port: int) -> list[str]:
    device = data.name
    command = [sys.executable, "-m", "edge_agent.cli", "train", "--cloud", f"127.0.0.1:{port}"]
    command += ["--data", DATA, "--shard", data.shard, "--device-id", device, "--fresh"]
    command += [
        "--report",
        str(folder / f"{device}.json"),
        "--model-dir",
        str(folder / device / "models"),
    ]
    command += [
        "--checkpoint-dir",
        str(folder / device / "checkpoints"),
        "--no-progress",
        "--no-plots",
    ]
    if ctx.scenario.alpha is not None:
        command += ["--dirichlet-alpha", str(ctx.scenario.alpha)]
    if data.profile:
        # The device's real profile: a cohort places it in its class (and its student) by it.
        command += ["--device-profile", data.profile]
    return command


def _device_result(ctx: RunContext, folder: Path, device: Device, data: DeviceData) -> DeviceResult:
    report = json.loads((folder / f"{device.name}.json").read_text())
    student = report["student"]
    # The ONNX student the device downloaded and verified, on everyone's held-out data.
    predictor = Predictor(Path(student["path"]), tuple(ctx.union_x.shape[1:]))
    union = predictor.accuracy(ctx.union_x, ctx.union_y)
    up, down = device.relay.snapshot()
    return DeviceResult(
        device.name,
        data.shard,
        float(student["accuracy"]),
        union,
        up,
        down,
        len(device.relay.connections),
        data.device_class,
    )


def proxy_file(folder: Path) -> Path:
    """The cloud's unlabelled proxy inputs for KOALA: the inputs of its presumed share only
    (the devices' shards are never in it); the npz spec needs labels, which the cloud ignores."""
    path = folder / "proxy.npz"
    if not path.exists():
        presumed = cloud_split(load_dataset(DATA), DEMO_PRESUMED_FRACTION)
        x = np.concatenate([presumed.train.x, presumed.heldout.x])
        np.savez(path, x=x, y=np.zeros(len(x), np.int64))
    return path


def labelled_file(folder: Path) -> Path:
    """The cloud's own labelled data (its presumed share, the teacher's), laid out so that
    ``--labelled-data`` holds out (every fifth sample) exactly the teacher's held-out part."""
    path = folder / "labelled.npz"
    if not path.exists():
        presumed = cloud_split(load_dataset(DATA), DEMO_PRESUMED_FRACTION)
        train, held = presumed.train, presumed.heldout
        n = len(train) + len(held)
        fifth = np.zeros(n, dtype=bool)
        fifth[::5] = True
        assert int(fifth.sum()) == len(held), "the presumed split is not 4:1"
        x = np.empty((n, *train.x.shape[1:]), train.x.dtype)
        y = np.empty(n, np.int64)
        x[fifth], y[fifth] = held.x, held.y
        x[~fifth], y[~fifth] = train.x, train.y
        np.savez(path, x=x, y=y)
    return path


COHORT = "compare"  # every device of a run joins this cohort


def cohort_file(path: Path, strategy: str) -> Path:
    """A ``--cohort-config`` file giving the cohort ``strategy`` instead of its mode's."""
    path.write_text(f'[cohorts.{COHORT}]\nstrategy = "{strategy}"\n')
    return path


def _run_cohort(ctx: RunContext, mode: str, strategy: str = "") -> SystemRun:
    """A cohort of ``ctx.devices`` in ``mode``: one cloud, one edge process per device;
    ``strategy`` overrides the mode's (through a cohort file, as an operator would)."""
    name = f"splitkd-{mode}-{strategy}-cohort" if strategy else f"splitkd-{mode}-cohort"
    proxy = proxy_file(ctx.folder.parent)
    labelled = labelled_file(ctx.folder.parent)
    cloud_flags = ["--proxy-data", f"npz:{proxy}", "--labelled-data", f"npz:{labelled}"]
    cloud_flags += ["--cohort-mode", mode]
    cloud_flags += ["--cohort-min-devices", str(len(ctx.devices)), "--round-timeout", "600"]
    cloud_flags += ["--rounds", str(ctx.rounds), "--local-epochs", str(ctx.local_epochs)]
    if strategy:
        cloud_flags += ["--cohort-config", str(cohort_file(ctx.folder / f"{name}.toml", strategy))]
    if mode == "federated" and ctx.options.get("weights_codec"):
        cloud_flags += ["--weights-codec", ctx.options["weights_codec"]]
    transport = {
        "federated": "splitkd gRPC, weights once per round (KOALA: the server model learns too)",
        "split": "splitkd gRPC, split steps per round, heads and tails averaged per round",
    }[mode]
    if strategy:
        transport += f"; strategy {strategy}"
    edge_flags = ["--cohort", COHORT, *(FRUGAL_WIRE if mode == "split" else [])]
    return _run_processes(ctx, name, cloud_flags, edge_flags, transport)


def run_split_cohort(ctx: RunContext) -> SystemRun:
    return _run_cohort(ctx, "split")


def run_federated_cohort(ctx: RunContext) -> SystemRun:
    return _run_cohort(ctx, "federated")


def run_federated_fedavg_cohort(ctx: RunContext) -> SystemRun:
    """The federated cohort without its teacher (FedAvg within each class, nothing more):
    what the server model's knowledge adds to the same rounds, bytes and students."""
    return _run_cohort(ctx, "federated", "fedavg")
