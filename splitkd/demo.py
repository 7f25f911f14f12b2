"""``make demo``: a cloud and two edges as separate processes, split KD on digits.

Starts ``splitkd-cloud serve`` and two ``splitkd-edge train`` processes on
loopback, follows their progress through the cloud's HTTP API, trains the
same student without a teacher on the same edge data as the baseline, and
writes ``runs/latest/report.json`` with a summary table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from splitkd import codecs
from splitkd.data.partition import DEMO_PRESUMED_FRACTION

# Each demo edge pretends to be a different device on a different link, so the
# energy estimates show how device and radio change the bill for the same job.
DEMO_PROFILES = [
    ("raspberry-pi-4", "wifi"),
    ("raspberry-pi-5", "ethernet"),
    ("jetson-nano", "lte"),
    ("laptop-x86", "ethernet"),
]


# The frugal wire (`make bench`'s wire table): teacher outputs once per sample,
# int8 with stochastic rounding, cut after the student's convolutions, held-out
# accuracy through the split every 5 epochs. Same accuracy, ~1/20 of the bytes.
DEMO_WIRE_CODEC = "int8-stochastic"
DEMO_STUDENT_CUT = 2
DEMO_EVAL_EVERY = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 600.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the cloud exited with code {process.returncode}; see {log_path}")
        try:
            health: dict[str, Any] = http_json(url)
            return health
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the cloud did not become healthy in {timeout:.0f} s; see {log_path}")


def student_alone(edge_report: dict[str, Any], data: str, shard: str) -> dict[str, Any]:
    """The same student, same data, same hyperparameters and class weights, trained without
    a teacher: its accuracy, macro recall and F1 and per-class recall on the same held-out set."""
    import torch

    from splitkd.classes import class_scores
    from splitkd.data import edge_split, load_dataset, parse_shard
    from splitkd.hyper import Hyperparameters
    from splitkd.models.spec import ModelSpec
    from splitkd.training import predict, train_supervised

    torch.set_num_threads(1)
    session = edge_report["session"]
    spec = ModelSpec.from_json(
        session["student_model"]["family"], session["student_model"]["spec_json"]
    )
    hyper = Hyperparameters(**session["hyperparameters"])
    split = edge_split(
        load_dataset(data),
        parse_shard(shard),
        presumed_fraction=edge_report["data"]["presumed_fraction"],
    )
    weights = edge_report["data"]["class_weights"]
    model = train_supervised(spec, split.train, hyper, class_weights=weights)
    predicted = predict(model, split.heldout.x).argmax(axis=1)
    return class_scores(predicted, split.heldout.y).as_report()


def point_latest(latest: Path, stamp: str) -> Path | None:
    """``runs/latest`` -> this run; a ``latest`` that is not splitkd's symlink is left alone."""
    if latest.is_symlink():
        latest.unlink()
    elif latest.exists():
        print(f"splitkd demo: {latest} is not a symlink; leaving it alone")
        return None
    latest.symlink_to(stamp)
    return latest


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.runs) / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = point_latest(Path(args.runs) / "latest", stamp) or run_dir
    grpc_port, http_port = free_port(), free_port()
    python = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    print(f"splitkd demo: run folder {run_dir}")
    cloud_log = run_dir / "cloud.log"
    cloud = subprocess.Popen(
        [
            python,
            "-m",
            "cloud_service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            *(["--teacher", args.teacher] if args.teacher else ["--teacher-data", args.data]),
            # The cloud and the edges are handed one data set: the demo's split, asked for.
            "--presumed-fraction",
            str(DEMO_PRESUMED_FRACTION),
            "--state-dir",
            str(run_dir / "cloud"),
            *(["--seed", str(args.seed)] if args.seed is not None else []),
        ],
        stdout=cloud_log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    edges: list[tuple[str, str, subprocess.Popen[bytes]]] = []
    try:
        doing = (
            "loading its teacher" if args.teacher else "training the teacher on its presumed data"
        )
        print(f"[1/4] cloud: {doing} (gRPC :{grpc_port}, HTTP :{http_port})…")
        health = wait_healthy(f"http://127.0.0.1:{http_port}/healthz", cloud, cloud_log)
        teacher = health["teacher"]
        print(
            f"      teacher {teacher['spec']}: {teacher['parameters']:,} parameters, "
            f"held-out accuracy {teacher['accuracy']:.4f} (samples: {teacher.get('samples')})"
        )
        print(
            f"[2/4] {args.edges} edges: split KD over gRPC (raw digits stay in the edge processes)…"
        )
        for i in range(args.edges):
            device, shard = f"edge-{i}", f"{i}/{args.edges}"
            command = [
                python,
                "-m",
                "edge_agent.cli",
                "train",
                "--cloud",
                f"127.0.0.1:{grpc_port}",
                "--data",
                args.data,
                "--shard",
                shard,
                "--presumed-fraction",
                str(DEMO_PRESUMED_FRACTION),
                "--device-id",
                device,
                "--report",
                str(run_dir / f"{device}.json"),
                "--model-dir",
                str(run_dir / device / "models"),
                "--no-progress",
                "--no-plots",
                "--checkpoint-dir",
                str(run_dir / device / "checkpoints"),
                "--device-profile",
                DEMO_PROFILES[i % len(DEMO_PROFILES)][0],
                "--link-profile",
                DEMO_PROFILES[i % len(DEMO_PROFILES)][1],
            ]
            if args.epochs:
                command += ["--epochs", str(args.epochs)]
            command += _wire_flags(args)
            log_file = (run_dir / f"{device}.log").open("wb")
            edges.append(
                (
                    device,
                    shard,
                    subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                )
            )
        _follow(edges, http_port)
        failed = [(d, p.returncode) for d, _, p in edges if p.returncode != 0]
        if failed:
            for device, code in failed:
                print(
                    f"error: {device} exited with code {code}; see {run_dir / (device + '.log')}",
                    file=sys.stderr,
                )
            return 1
        print(
            "[3/4] edges downloaded and verified the ONNX student; baseline: same student, no teacher…"
        )
        reports: dict[str, Any] = {}
        full_reports: dict[str, Any] = {}
        alone: dict[str, float] = {}
        for device, shard, _ in edges:
            edge_report = json.loads((run_dir / f"{device}.json").read_text())
            edge_report["student_alone"] = student_alone(edge_report, args.data, shard)
            alone[device] = edge_report["student_alone"]["accuracy"]
            full_reports[device] = edge_report
            reports[device] = {
                k: v for k, v in edge_report.items() if k not in ("history", "evaluations")
            }
    finally:
        for _, _, process in edges:
            if process.poll() is None:
                process.kill()
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(10)
        except subprocess.TimeoutExpired:
            cloud.kill()

    distilled = sum(r["student"]["accuracy"] for r in reports.values()) / len(reports)
    macro_recall = sum(r["student"]["macro_recall"] for r in reports.values()) / len(reports)
    baseline = sum(alone.values()) / len(alone)
    first = next(iter(reports.values()))
    summary = {
        "teacher": {
            "accuracy": teacher["accuracy"],
            "parameters": teacher["parameters"],
            "spec": teacher["spec"],
            "samples": teacher.get("samples"),
        },
        "edges": reports,
        "student": {
            "accuracy": distilled,
            "macro_recall": macro_recall,
            "parameters": next(iter(reports.values()))["student"]["parameters"],
        },
        "student_alone": {"accuracy": baseline, "per_edge": alone},
        "kd_gain": distilled - baseline,
        "wire": {
            "codec": first["session"]["wire_codec"],
            "student_cut": first["session"]["student_cut"],
            "teacher_cache": first["session"]["teacher_cache"],
        },
        "wall_seconds": time.monotonic() - started,
        "run_dir": str(run_dir),
    }
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
    print("[4/4] plots…")
    _plots(run_dir, full_reports)
    _table(summary)
    print(f"report: {latest / 'report.json'}")
    return 0


def _follow(edges: list[tuple[str, str, subprocess.Popen[bytes]]], http_port: int) -> None:
    """A progress line from the cloud's view of the sessions until every edge exits."""
    last = ""
    while any(p.poll() is None for _, _, p in edges):
        try:
            sessions = http_json(f"http://127.0.0.1:{http_port}/v1/sessions")["sessions"]
            line = "  ".join(f"{s['device_id']}: step {s['steps']}" for s in sessions)
        except OSError:
            line = last
        if line != last and sys.stdout.isatty():
            print(f"\r      {line}", end="", flush=True)
        last = line
        time.sleep(0.5)
    if sys.stdout.isatty():
        print()


def _wire_flags(args: argparse.Namespace) -> list[str]:
    """The frugal wire a battery device wants (README, "The wire"), unless asked otherwise."""
    flags = ["--wire-codec", args.wire_codec, "--eval-every", str(args.eval_every)]
    if args.student_cut:
        flags += ["--student-cut", str(args.student_cut)]
    return flags + (["--no-teacher-cache"] if args.no_teacher_cache else [])


def _plots(run_dir: Path, reports: dict[str, Any]) -> None:
    try:
        from splitkd import plots
    except ImportError:
        print("      (no plots: the [plots] extra, matplotlib, is not installed)")
        return
    for path in plots.write_plots(run_dir, reports):
        print(f"      {path}")


def _table(summary: dict[str, Any]) -> None:
    rows = [
        (
            "device",
            "profile",
            "accuracy",
            "no-teacher",
            "steps",
            "MB up",
            "MB down",
            "est. J",
            "seconds",
        )
    ]
    for device, report in summary["edges"].items():
        rows.append(
            (
                device,
                f"{report['energy']['device_profile']}/{report['energy']['link_profile']}",
                f"{report['student']['accuracy']:.4f}",
                f"{report['student_alone']['accuracy']:.4f}",
                str(report["steps"]),
                f"{report['traffic']['bytes_up'] / 1e6:.2f}",
                f"{report['traffic']['bytes_down'] / 1e6:.2f}",
                f"{report['energy']['estimate_joules']['total']:.1f}",
                f"{report['wall_seconds']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    teacher, student = summary["teacher"], summary["student"]
    print(
        f"\n  teacher {teacher['parameters']:,} parameters, accuracy {teacher['accuracy']:.4f}; "
        f"student {student['parameters']:,} parameters ({teacher['parameters'] / student['parameters']:.0f}x "
        f"smaller), distilled {student['accuracy']:.4f} vs no teacher {summary['student_alone']['accuracy']:.4f}"
    )
    traffic = [
        r["traffic"]["bytes_up"] + r["traffic"]["bytes_down"] for r in summary["edges"].values()
    ]
    wire = summary.get("wire", {})
    print(
        f"  wire: {wire.get('codec')} codec, student cut {wire.get('student_cut')}, teacher cache "
        f"{'on' if wire.get('teacher_cache') else 'off'}: {sum(traffic) / len(traffic) / 1e6:.2f} MB "
        "up + down per edge"
    )
    print(f"  whole demo: {summary['wall_seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitkd.demo", description=__doc__)
    parser.add_argument(
        "--data", default="digits", help="dataset spec shared by the cloud and the edges"
    )
    parser.add_argument("--edges", type=int, default=2, help="number of edge processes (default 2)")
    parser.add_argument(
        "--epochs", type=int, default=0, help="epochs per edge (default: the cloud's)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed sent to every edge (default: the cloud's); one seed, one result",
    )
    parser.add_argument(
        "--teacher",
        default="",
        help="teacher checkpoint to load instead of training one ('splitkd-cloud train-teacher')",
    )
    parser.add_argument("--runs", default="runs", help="folder for run outputs (default runs/)")
    wire = parser.add_argument_group(
        "the wire (defaults: the frugal choice of `make bench`'s wire table; "
        "--wire-codec float32 --student-cut 1 --eval-every 1 --no-teacher-cache is the old wire)"
    )
    wire.add_argument(
        "--wire-codec",
        default=DEMO_WIRE_CODEC,
        choices=codecs.CODECS,
        help=f"codec of activations and gradients (default {DEMO_WIRE_CODEC})",
    )
    wire.add_argument(
        "--student-cut",
        type=int,
        default=DEMO_STUDENT_CUT,
        help=f"student stages on the devices (default {DEMO_STUDENT_CUT}; 0: the cloud's)",
    )
    wire.add_argument(
        "--eval-every",
        type=int,
        default=DEMO_EVAL_EVERY,
        help=f"epochs between held-out evaluations (default {DEMO_EVAL_EVERY})",
    )
    wire.add_argument(
        "--no-teacher-cache",
        action="store_true",
        help="send teacher activations every epoch instead of once per sample",
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
