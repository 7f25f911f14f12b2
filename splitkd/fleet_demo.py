"""``make fleet-demo``: a fleet of non-IID devices learns one student together, in both modes.

For each cohort mode (``split``, ``federated``) it starts one ``splitkd-cloud
serve`` and four ``splitkd-edge train --cohort fleet`` processes on loopback.
The edge data is dealt to a fleet of eight devices, Dirichlet(0.3) per class,
and the demo's four edges are four of them: each holds a small, skewed slice
(some classes absent), as a device of a real fleet does. As references it trains, in this process, each device's
student alone on its own data and the student by centralised KD on the
pooled data. Every student is evaluated on the union of the devices'
held-out data. A second federated run starts from a teacher that saw only a
few labelled samples and shows the server model learning from the fleet.
Prints a table, writes ``runs/fleet/latest/report.json`` and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from splitkd import codecs
from splitkd.demo import (
    DEMO_STUDENT_CUT,
    DEMO_WIRE_CODEC,
    free_port,
    http_json,
    point_latest,
    wait_healthy,
)
from splitkd.weights_codec import DEFAULT_WEIGHTS_CODEC, WEIGHTS_CODECS

PROFILES = [
    ("raspberry-pi-4", "wifi"),
    ("raspberry-pi-5", "ethernet"),
    ("jetson-nano", "lte"),
    ("laptop-x86", "wifi"),
]
PRESUMED = 0.4


def _pythonpath_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _teacher_options(teacher: Path | None, proxy: Path) -> list[str]:
    """No file: the cloud trains its teacher on its presumed share of the digits, which are
    also its proxy inputs and, labelled, the anchor that keeps the server model's reverse
    KD honest (the default ``serve`` path). A file (the few-label teacher): its proxy inputs
    only, unlabelled."""
    if teacher is None:
        return ["--teacher-data", "digits", "--presumed-fraction", str(PRESUMED)]
    return ["--teacher", str(teacher), "--proxy-data", f"npz:{proxy}"]


def _start_cloud(
    folder: Path, teacher: Path | None, proxy: Path, mode: str, args: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], int, int]:
    grpc_port, http_port = free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "cloud.log"
    command = [
        sys.executable,
        "-m",
        "cloud_service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        *_teacher_options(teacher, proxy),
        "--state-dir",
        str(folder / "cloud"),
        "--cohort-mode",
        mode,
        "--cohort-min-devices",
        str(args.edges),
        "--rounds",
        str(args.rounds),
        "--local-epochs",
        str(args.local_epochs),
        "--round-timeout",
        str(args.round_timeout),
        # Every round's student and server model stay in the registry: the per-round plot reads them.
        "--keep-versions",
        "0",
    ]
    process = subprocess.Popen(
        command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=_pythonpath_env()
    )
    wait_healthy(f"http://127.0.0.1:{http_port}/healthz", process, log)
    return process, grpc_port, http_port


def _wire_flags(mode: str, args: argparse.Namespace) -> list[str]:
    """Split rounds on the frugal wire of ``make demo`` (codec, cut, teacher outputs kept
    in the cloud across rounds), unless asked otherwise; federated rounds send only weights."""
    if mode != "split":
        return ["--weights-codec", args.weights_codec]  # fedwire: how the weights travel
    flags = ["--wire-codec", args.wire_codec, "--student-cut", str(args.student_cut)]
    return flags + (["--no-teacher-cache"] if args.no_teacher_cache else [])


def _start_edges(
    folder: Path, grpc_port: int, mode: str, args: argparse.Namespace
) -> list[subprocess.Popen[bytes]]:
    edges = []
    for i in range(args.edges):
        device = f"edge-{i}"
        profile, link = PROFILES[i % len(PROFILES)]
        command = [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "train",
            "--cloud",
            f"127.0.0.1:{grpc_port}",
            "--data",
            "digits",
            "--shard",
            f"{i}/{args.fleet_size}",
            "--dirichlet-alpha",
            str(args.alpha),
            "--presumed-fraction",
            str(PRESUMED),
            "--cohort",
            "fleet",
            "--device-id",
            device,
            "--device-profile",
            profile,
            "--link-profile",
            link,
            "--report",
            str(folder / f"{device}.json"),
            "--model-dir",
            str(folder / device / "models"),
            "--checkpoint-dir",
            str(folder / device / "checkpoints"),
            "--no-progress",
            "--no-plots",
            *_wire_flags(mode, args),
        ]
        log = (folder / f"{device}.log").open("wb")
        edges.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_pythonpath_env())
        )
    return edges


def _follow(edges: list[subprocess.Popen[bytes]], http_port: int, label: str) -> None:
    last = ""
    while any(p.poll() is None for p in edges):
        try:
            cohorts = http_json(f"http://127.0.0.1:{http_port}/v1/cohorts")["cohorts"]
            line = "  ".join(
                f"{c['name']}: round {c['round']}/{c['config']['rounds']}, {c['devices']} devices"
                for c in cohorts
            )
        except OSError:
            line = last
        if line != last:
            print(f"      {label} {line}", flush=True)
        last = line
        time.sleep(1.0)


def _original(args: argparse.Namespace) -> argparse.Namespace:
    """The split cohort's wire when the fleet issue set its traffic bar: float32 at cut 1,
    the teacher's activations every epoch (no cache)."""
    return argparse.Namespace(
        **{**vars(args), "wire_codec": "float32", "student_cut": 1, "no_teacher_cache": True}
    )


def run_mode(
    mode: str, folder: Path, teacher: Path | None, proxy: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One cohort run: a cloud and the edges as processes; returns their reports and the cloud's folder."""
    started = time.monotonic()
    cloud, grpc_port, http_port = _start_cloud(folder, teacher, proxy, mode, args)
    edges: list[subprocess.Popen[bytes]] = []
    try:
        edges = _start_edges(folder, grpc_port, mode, args)
        _follow(edges, http_port, mode)
        failed = [i for i, p in enumerate(edges) if p.returncode != 0]
        if failed:
            raise SystemExit(f"{mode}: edges {failed} failed; see {folder}/edge-N.log")
        cohort = http_json(f"http://127.0.0.1:{http_port}/v1/cohorts/fleet")
    finally:
        for process in edges:
            if process.poll() is None:
                process.kill()
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(30)
        except subprocess.TimeoutExpired:
            cloud.kill()
    reports = [json.loads((folder / f"edge-{i}.json").read_text()) for i in range(args.edges)]
    return {
        "reports": reports,
        "cohort": cohort,
        "models": folder / "cloud" / "models",
        "seconds": time.monotonic() - started,
    }


# -- references and evaluation (in this process) ----------------------------------------------
def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: x.astype(np.float32)})[0]
    return float((np.asarray(logits).argmax(axis=1) == y).mean())


def _versions_accuracy(models: Path, name: str, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Accuracy of every published version of ``name``, oldest first."""
    folder = models / name
    versions = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    return [_onnx_accuracy(folder / str(v) / "model.onnx", x, y) for v in versions]


def prepare(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Teachers, the proxy inputs, the devices' splits and the in-process references."""
    import torch

    from cloud_service.teacher import TEACHER_HYPER, Teacher, train_teacher
    from splitkd.data import edge_split, load_dataset
    from splitkd.data.partition import Shard, cloud_split
    from splitkd.data.specs import Dataset
    from splitkd.hyper import Hyperparameters
    from splitkd.models import zoo
    from splitkd.training import accuracy_of, predict, train_kd_centralised, train_supervised

    torch.set_num_threads(2)
    dataset = load_dataset("digits")
    presumed = cloud_split(dataset, PRESUMED)
    splits = [
        edge_split(dataset, Shard(i, args.fleet_size), alpha=args.alpha, presumed_fraction=PRESUMED)
        for i in range(args.edges)
    ]
    union_x = np.concatenate([s.heldout.x for s in splits])
    union_y = np.concatenate([s.heldout.y for s in splits])
    proxy = folder / "proxy.npz"
    # Inputs only: the labels array is required by the npz spec and ignored by the cloud.
    np.savez(
        proxy,
        x=np.concatenate([presumed.train.x, presumed.heldout.x]),
        y=np.zeros(len(presumed.train) + len(presumed.heldout), np.int64),
    )
    print(
        "[1/5] teachers: one on the cloud's presumed data, one on a few labelled samples…",
        flush=True,
    )
    strong = train_teacher("digits", presumed_fraction=PRESUMED)
    strong.save(folder / "teacher.safetensors")
    few = presumed.train.subset(np.arange(args.few_labels))
    weak_model = train_supervised(strong.spec, few, TEACHER_HYPER)
    weak = Teacher(
        strong.spec,
        weak_model,
        accuracy_of(predict(weak_model, presumed.heldout.x), presumed.heldout.y),
        "digits-few",
    )
    weak.save(folder / "teacher-few.safetensors")
    print("[2/5] references: each device alone, and centralised KD on the pooled data…", flush=True)
    spec, hyper = zoo.default_student(dataset.signature), Hyperparameters()
    alone = [
        accuracy_of(predict(train_supervised(spec, s.train, hyper), union_x), union_y)
        for s in splits
    ]
    pooled = Dataset(
        np.concatenate([s.train.x for s in splits]),
        np.concatenate([s.train.y for s in splits]),
        dataset.signature,
    )
    central = train_kd_centralised(spec, strong.model, pooled, hyper).student
    return {
        "splits": splits,
        "union": (union_x, union_y),
        "proxy": proxy,
        "teacher": {
            "accuracy_union": accuracy_of(predict(strong.model, union_x), union_y),
            "parameters": strong.parameters,
            "spec": strong.spec,
        },
        "weak_teacher": {"labelled": args.few_labels},
        "student_spec": spec,
        "alone": alone,
        "centralised": accuracy_of(predict(central, union_x), union_y),
        "class_counts": [np.bincount(s.train.y, minlength=10).tolist() for s in splits],
    }


def device_costs(refs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Device training FLOPs and model storage: the cohort student vs the teacher on the device."""
    from splitkd.flops import TRAIN_FORWARD_RATIO, forward_flops, parameter_bytes

    spec, teacher = refs["student_spec"], refs["teacher"]["spec"]
    samples = float(np.mean([len(s.train) for s in refs["splits"]]))
    epochs = args.rounds * args.local_epochs
    student_train = TRAIN_FORWARD_RATIO * forward_flops(spec) * samples * epochs
    teacher_train = TRAIN_FORWARD_RATIO * forward_flops(teacher) * samples * epochs
    # Split mode: the device trains the student's head and runs the frozen teacher head forward.
    split_device = (
        samples
        * epochs
        * (TRAIN_FORWARD_RATIO * forward_flops(spec, 0, 1) + forward_flops(teacher, 0, 1))
    )
    return {
        "federated_train_gflops": student_train / 1e9,
        "split_device_gflops": split_device / 1e9,
        "teacher_on_device_train_gflops": teacher_train / 1e9,
        "flops_saving": 1 - student_train / teacher_train,
        "student_bytes": parameter_bytes(spec),
        "teacher_bytes": parameter_bytes(teacher),
        "storage_saving": 1 - parameter_bytes(spec) / parameter_bytes(teacher),
    }


def summarise(mode: str, result: dict[str, Any], refs: dict[str, Any]) -> dict[str, Any]:
    x, y = refs["union"]
    per_round = _versions_accuracy(result["models"], "cohort-fleet", x, y)
    reports = result["reports"]
    mb = [(r["traffic"]["bytes_up"] + r["traffic"]["bytes_down"]) / 1e6 for r in reports]
    return {
        "mode": mode,
        "accuracy": per_round[-1],
        "per_round_accuracy": per_round,
        "device_accuracy": [r["student"]["accuracy"] for r in reports],
        "mb_per_device": float(np.mean(mb)),
        "mb_up_per_device": float(np.mean([r["traffic"]["bytes_up"] / 1e6 for r in reports])),
        "seconds": result["seconds"],
        "server_model_accuracy": _versions_accuracy(result["models"], "teacher", x, y),
        "rounds": result["cohort"]["rounds"],
        "wire": reports[0]["cohort"].get("wire"),
    }


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(args.runs)
    folder = root / stamp
    folder.mkdir(parents=True, exist_ok=True)
    point_latest(root / "latest", stamp)
    print(
        f"splitkd fleet demo: {args.edges} non-IID devices of a fleet of {args.fleet_size} "
        f"(Dirichlet {args.alpha}), run folder {folder}"
    )
    refs = prepare(folder, args)
    results: dict[str, Any] = {}
    for step, mode in enumerate(args.modes, start=3):
        print(
            f"[{step}/5] {mode} cohort: a cloud and {args.edges} edge processes, {args.rounds} rounds…",
            flush=True,
        )
        results[mode] = summarise(
            mode,
            run_mode(mode, folder / mode, None, refs["proxy"], args),
            refs,
        )
    if args.original_wire and "split" in args.modes:
        print("      split cohort again on the original wire (the federated traffic's yardstick)…")
        original = run_mode(
            "split", folder / "split-original", None, refs["proxy"], _original(args)
        )
        results["split-original"] = summarise("split", original, refs)
    if args.server_learns:
        print(
            "[5/5] federated cohort against a teacher that saw a few labelled samples…", flush=True
        )
        weak = run_mode(
            "federated",
            folder / "server-learns",
            folder / "teacher-few.safetensors",
            refs["proxy"],
            args,
        )
        results["server-learns"] = summarise("federated", weak, refs)
    summary = _summary(refs, results, args, time.monotonic() - started)
    (folder / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    _plot(folder, summary)
    _table(summary)
    print(f"report: {folder / 'report.json'}")
    return 0


def _summary(
    refs: dict[str, Any], results: dict[str, Any], args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    return {
        "devices": args.edges,
        "fleet_size": args.fleet_size,
        "dirichlet_alpha": args.alpha,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "class_counts": refs["class_counts"],
        "union_heldout_samples": len(refs["union"][1]),
        "teacher_accuracy_union": refs["teacher"]["accuracy_union"],
        "alone": refs["alone"],
        "best_alone": max(refs["alone"]),
        "centralised_kd": refs["centralised"],
        "modes": results,
        "device_costs": device_costs(refs, args),
        "wall_seconds": seconds,
    }


def _table(summary: dict[str, Any]) -> None:
    modes = summary["modes"]
    rows = [("student", "accuracy", "MB/device", "seconds")]
    rows.append(("each device alone (best)", f"{summary['best_alone']:.4f}", "0", "-"))
    rows.append(("each device alone (mean)", f"{np.mean(summary['alone']):.4f}", "0", "-"))
    rows.append(
        ("centralised KD, pooled data", f"{summary['centralised_kd']:.4f}", "(all data)", "-")
    )
    for name in ("split", "split-original", "federated"):
        if name in modes:
            m = modes[name]
            wire = m.get("wire") or {}
            label = f"{name.split('-')[0]} cohort"
            if wire:
                cache = ", cache" if wire["teacher_cache"] else ""
                label += f" ({wire['codec']}, cut {wire['student_cut']}{cache})"
            rows.append(
                (
                    label,
                    f"{m['accuracy']:.4f}",
                    f"{m['mb_per_device']:.3f}",
                    f"{m['seconds']:.0f}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for row in rows:
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(
        f"\n  evaluated on the union of the devices' held-out data ({summary['union_heldout_samples']} samples)"
    )
    for name in ("split", "federated"):
        if name in modes:
            m = modes[name]
            print(
                f"  {name}: {100 * (m['accuracy'] - summary['best_alone']):+.1f} points vs the best device alone "
                f"({100 * (m['accuracy'] - float(np.mean(summary['alone']))):+.1f} vs their mean), "
                f"{100 * (m['accuracy'] - summary['centralised_kd']):+.1f} vs centralised KD"
            )
    if "split" in modes and "federated" in modes:
        f, s = modes["federated"], modes["split"]
        print(
            f"  federated traffic: 1/{s['mb_per_device'] / f['mb_per_device']:.0f} of the split "
            f"cohort's, accuracy {100 * (f['accuracy'] - s['accuracy']):+.1f} points"
        )
        if "split-original" in modes:
            o = modes["split-original"]
            print(
                f"  against the split cohort on the original wire: 1/"
                f"{o['mb_per_device'] / f['mb_per_device']:.0f} of its traffic, accuracy "
                f"{100 * (f['accuracy'] - o['accuracy']):+.1f} points; the frugal wire moves "
                f"{o['mb_per_device'] / s['mb_per_device']:.1f}x fewer bytes than the original"
            )
    c = summary["device_costs"]
    print(
        f"  device training vs the teacher on the device: {100 * c['flops_saving']:.1f} % fewer FLOPs "
        f"({c['federated_train_gflops']:.2f} vs {c['teacher_on_device_train_gflops']:.1f} GFLOP), "
        f"{100 * c['storage_saving']:.1f} % less storage "
        f"({c['student_bytes'] / 1e3:.1f} kB vs {c['teacher_bytes'] / 1e6:.2f} MB)"
    )
    if "server-learns" in modes:
        acc = modes["server-learns"]["server_model_accuracy"]
        print(
            f"  server model from few labels, on the devices' data: v1 {acc[0]:.4f} -> "
            f"v{len(acc)} {acc[-1]:.4f} after federated rounds"
        )
    print(f"  whole demo: {summary['wall_seconds']:.0f} s")


def _plot(folder: Path, summary: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("      (no plots: the [plots] extra, matplotlib, is not installed)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in summary["modes"].items():
        acc = m["per_round_accuracy"]
        left.plot(range(1, len(acc) + 1), acc, marker=".", label=f"{name} cohort")
    left.axhline(summary["centralised_kd"], ls="--", color="grey", label="centralised KD (pooled)")
    left.axhline(summary["best_alone"], ls=":", color="red", label="best device alone")
    left.set(
        title="cohort student on the union of held-out data", xlabel="round", ylabel="accuracy"
    )
    for name, m in summary["modes"].items():
        acc = m["server_model_accuracy"]
        if len(acc) > 1:
            right.plot(range(1, len(acc) + 1), acc, marker=".", label=f"server model ({name})")
    right.set(title="server model (teacher) versions", xlabel="version", ylabel="accuracy")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "fleet-rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"      {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitkd.fleet_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--edges", type=int, default=4, help="devices in the cohort (default 4)")
    parser.add_argument(
        "--fleet-size",
        type=int,
        default=8,
        help="devices the edge data is dealt to; the demo's edges are the first --edges of "
        "them (default 8: each holds a small slice; 4 gives the demo's devices all of it)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.3,
        help="Dirichlet alpha of the non-IID split (default 0.3)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="rounds per cohort (default 20)")
    parser.add_argument(
        "--local-epochs", type=int, default=3, help="device epochs per round (default 3)"
    )
    parser.add_argument("--round-timeout", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument(
        "--modes", nargs="+", default=["split", "federated"], choices=["split", "federated"]
    )
    parser.add_argument(
        "--no-original-wire",
        dest="original_wire",
        action="store_false",
        help="skip the split cohort's second run on the original wire (float32, cut 1, "
        "the teacher's activations every epoch), the yardstick of the federated traffic",
    )
    parser.add_argument(
        "--few-labels",
        type=int,
        default=60,
        help="labelled samples of the weak teacher (default 60)",
    )
    parser.add_argument(
        "--no-server-learns",
        dest="server_learns",
        action="store_false",
        help="skip the run that shows the server model learning from the fleet",
    )
    parser.add_argument(
        "--runs", default="runs/fleet", help="folder for run outputs (default runs/fleet)"
    )
    wire = parser.add_argument_group(
        "the split cohort's wire (defaults: make demo's frugal wire; --wire-codec float32 "
        "--student-cut 1 --no-teacher-cache is the old wire)"
    )
    wire.add_argument("--wire-codec", default=DEMO_WIRE_CODEC, choices=codecs.CODECS)
    wire.add_argument("--student-cut", type=int, default=DEMO_STUDENT_CUT)
    wire.add_argument("--no-teacher-cache", action="store_true")
    wire.add_argument(
        "--weights-codec",
        default=DEFAULT_WEIGHTS_CODEC,
        choices=WEIGHTS_CODECS,
        help="the federated cohort's weights: int8 deltas (default) or float32, whole",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.edges <= args.fleet_size:
        parser.error(f"--edges must be in 1..--fleet-size ({args.fleet_size}), got {args.edges}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
