"""``make lifecycle-demo``: the DiReDi loop end to end, with a real cloud process and real gRPC.

The cloud holds presumed digits (dark strokes on a light background, as scanned
on paper). The user's device sees the same digits with inverted polarity (light
strokes on a dark screen: a dark-mode touch pad, a chalkboard camera). Stages:
base student (distilled in the cloud on presumed data) -> pulled and served ->
the user corrects predictions (POST /v1/feedback) -> ``splitkd-edge adapt`` ->
the cloud's teacher learns the difference (guarded) -> a new student -> served.
Writes runs/lifecycle/latest/{report.json,accuracy.png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from splitkd.data.partition import DEMO_PRESUMED_FRACTION
from splitkd.demo import free_port, point_latest, wait_healthy

FEEDBACK_RECORDS = 150  # corrections the user makes while using the base student


def user_data(folder: Path) -> Path:
    """The user's exclusive data: the device's part of digits, polarity inverted."""
    from splitkd.data import load_dataset
    from splitkd.data.partition import presumed_split

    dataset = load_dataset("digits")
    _, device = presumed_split(len(dataset), DEMO_PRESUMED_FRACTION)
    path = folder / "user.npz"
    np.savez(path, x=invert(dataset.x[device]), y=dataset.y[device])
    return path


def invert(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(1.0 - x, dtype=np.float32)


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def served_accuracy(url: str, x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """Accuracy of what the edge serves right now, asked over its HTTP API."""
    answer = _post(f"{url}/v1/predict", {"inputs": x.tolist()})
    predicted = np.array([p["class"] for p in answer["predictions"]])
    model = answer["model"]
    return float((predicted == y).mean()), f"{model['name']} v{model['version']}"


def _cli(module: str, *args: str, log: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        done = subprocess.run(
            [sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    if done.returncode != 0:
        raise SystemExit(f"{module} {args[0]} failed (code {done.returncode}); see {log}")


def _start(module: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def evaluate(run_dir: Path, models: Path, adapt_report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stage's accuracy on the user's scenario and on the presumed scenario."""
    from cloud_service.teacher import Teacher
    from edge_agent.inference import Predictor
    from splitkd import rediredi
    from splitkd.data import load_dataset
    from splitkd.data.partition import cloud_split, edge_split

    presumed = cloud_split(load_dataset("digits"), DEMO_PRESUMED_FRACTION).heldout
    user = edge_split(load_dataset(f"npz:{run_dir / 'user.npz'}"), presumed_fraction=0.0).heldout
    cloud = run_dir / "cloud"
    rows = []
    v2 = cloud / "teacher-versions" / f"v{adapt_report['teacher']['version_after']}.safetensors"
    for stage, path in (("teacher v1", cloud / "teacher.safetensors"), ("teacher v2", v2)):
        if path.is_file():
            model = Teacher.load(path).model
            rows.append(
                {
                    "stage": stage,
                    "user": rediredi.accuracy(model, user.x, user.y),
                    "presumed": rediredi.accuracy(model, presumed.x, presumed.y),
                }
            )
    for stage, folder in (("base student", models / "base" / "1"), ("new student", None)):
        if folder is None:
            folder = Path(adapt_report["student"]["path"]).parent
        predictor = Predictor(folder / "model.onnx", (1, 8, 8))
        rows.append(
            {
                "stage": f"{stage} ({folder.parent.name} v{folder.name})",
                "user": predictor.accuracy(user.x, user.y),
                "presumed": predictor.accuracy(presumed.x, presumed.y),
            }
        )
    adapted = {
        "stage": "adapted on device",
        "user": adapt_report["adapted"]["accuracy"],
        "presumed": None,  # the device has no presumed data to measure it on
    }
    # In the loop's order: teacher v1, base student, adapted, teacher v2, new student.
    order = ("teacher v1", "base student", "adapted on device", "teacher v2", "new student")
    return sorted([*rows, adapted], key=lambda row: order.index(row["stage"].split(" (")[0]))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    index = np.arange(len(rows))
    ax.bar(index - 0.2, [r["user"] for r in rows], 0.4, label="user's scenario (inverted)")
    presumed = [float("nan") if r["presumed"] is None else r["presumed"] for r in rows]
    ax.bar(index + 0.2, presumed, 0.4, label="presumed scenario")  # NaN: no bar
    ax.set_xticks(index, [r["stage"].split(" (")[0] for r in rows], rotation=15)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("DiReDi: accuracy at each stage of the feedback loop")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(args.runs)
    run_dir = root / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = point_latest(root / "latest", stamp) or run_dir
    grpc_port, http_port, edge_port = free_port(), free_port(), free_port()
    models, log = run_dir / "edge" / "models", run_dir / "edge.log"
    print(f"splitkd lifecycle demo: run folder {run_dir}")
    cloud = _start(
        "cloud_service.cli",
        "serve",
        "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port),
        "--http-port", str(http_port),
        "--teacher-data", "digits",
        "--presumed-fraction", str(DEMO_PRESUMED_FRACTION),
        "--state-dir", str(run_dir / "cloud"),
        "--base-student", "base",
        log=run_dir / "cloud.log",
    )  # fmt: skip
    edge = None
    try:
        print("[1/6] cloud: teacher on presumed digits, base student distilled on them…")
        wait_healthy(f"http://127.0.0.1:{http_port}/healthz", cloud, run_dir / "cloud.log")
        user = user_data(run_dir)
        print("[2/6] device: pull 'base' (checksum verified) and serve it…")
        _cli("edge_agent.cli", "pull", "--cloud-http", f"http://127.0.0.1:{http_port}",
             "--model", "base", "--model-dir", str(models), log=log)  # fmt: skip
        edge = _start("edge_agent.cli", "serve", "--http-port", str(edge_port),
                      "--model-dir", str(models), "--device-id", "user-0", log=log)  # fmt: skip
        edge_url = f"http://127.0.0.1:{edge_port}"
        wait_healthy(f"{edge_url}/healthz", edge, log, timeout=60)
        figures = _use_and_adapt(run_dir, models, user, edge_url, grpc_port, log)
        return _finish(run_dir, latest, models, figures, started)
    finally:
        for process in (edge, cloud):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)


def _use_and_adapt(
    run_dir: Path, models: Path, user: Path, edge_url: str, grpc_port: int, log: Path
) -> dict[str, Any]:
    from splitkd.data import load_dataset
    from splitkd.data.partition import edge_split

    split = edge_split(load_dataset(f"npz:{user}"), presumed_fraction=0.0)
    served_before, name_before = served_accuracy(edge_url, split.heldout.x, split.heldout.y)
    print(f"      serving {name_before}: {served_before:.3f} on the user's (inverted) digits")
    print(f"[3/6] user: {FEEDBACK_RECORDS} corrections via POST /v1/feedback (kept on the device)…")
    x, y = split.train.x[:FEEDBACK_RECORDS], split.train.y[:FEEDBACK_RECORDS]
    _post(f"{edge_url}/v1/feedback", {"inputs": x.tolist(), "labels": y.tolist()})
    with urllib.request.urlopen(f"{edge_url}/v1/feedback/stats", timeout=10) as response:
        stats = json.loads(response.read())
    print(f"      feedback store: {stats['records']} records")
    print("[4/6] device: adapt, report only the adapted model's answers on the cloud's probes…")
    print("[5/6] cloud: new teacher version (guardrail), new student for the device…")
    report_path = run_dir / "adapt.json"
    _cli("edge_agent.cli", "adapt", "--cloud", f"127.0.0.1:{grpc_port}", "--data", f"npz:{user}",
         "--feedback", "--model-dir", str(models), "--device-id", "user-0",
         "--report", str(report_path), log=log)  # fmt: skip
    adapt_report = json.loads(report_path.read_text())
    print("[6/6] device: serving the new student if it is better on its held-out data…")
    served_after, name_after = served_accuracy(edge_url, split.heldout.x, split.heldout.y)
    print(f"      serving {name_after}: {served_after:.3f} on the user's digits")
    return {
        "adapt": adapt_report,
        "served": {"before": [name_before, served_before], "after": [name_after, served_after]},
        "feedback_records": stats["records"],
    }


def _finish(
    run_dir: Path, latest: Path, models: Path, figures: dict[str, Any], started: float
) -> int:
    adapt_report = figures["adapt"]
    rows = evaluate(run_dir, models, adapt_report)
    print(f"\n{'stage':34} {'user (inverted)':>16} {'presumed':>10}")
    for row in rows:
        presumed = "-" if row["presumed"] is None else f"{row['presumed']:.3f}"
        print(f"{row['stage']:34} {row['user']:16.3f} {presumed:>10}")
    named = {row["stage"].split(" (")[0]: row for row in rows}
    if "teacher v2" not in named:
        print(f"the cloud refused the update: {adapt_report['reason']}")
        return 1
    teacher1, teacher2 = named["teacher v1"], named["teacher v2"]
    base, new = named["base student"], named["new student"]
    traffic, guardrail = adapt_report["traffic"], adapt_report["guardrail"]
    checks = {
        "new student vs base on the user's scenario (>= +20 points)": (
            new["user"] - base["user"], new["user"] - base["user"] >= 0.20),
        "new student vs base on the presumed scenario (>= -3 points)": (
            new["presumed"] - base["presumed"], new["presumed"] - base["presumed"] >= -0.03),
        "teacher on the user's scenario (rises)": (
            teacher2["user"] - teacher1["user"], teacher2["user"] > teacher1["user"]),
        "teacher on presumed held-out (within the guardrail)": (
            guardrail["presumed_accuracy_after"] - guardrail["presumed_accuracy_before"],
            guardrail["presumed_accuracy_before"] - guardrail["presumed_accuracy_after"]
            <= guardrail["margin"] + 1e-9),
    }  # fmt: skip
    print()
    for what, (delta, ok) in checks.items():
        print(f"{'ok ' if ok else 'NO '} {what}: {delta * 100:+.1f} points")
    print(
        f"    adapt sent {traffic['bytes_up']:,} bytes up ({traffic['probes']} probe answers) vs "
        f"{traffic['raw_data_bytes']:,} bytes of the user's data raw "
        f"({traffic['raw_data_bytes'] / max(1, traffic['bytes_up']):.1f}x more); "
        f"{traffic['bytes_down']:,} bytes down"
    )
    plot(rows, run_dir / "accuracy.png")
    report = {"stages": rows, "checks": {k: v[1] for k, v in checks.items()}, **figures}
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nreport: {latest}/report.json, plot: {latest}/accuracy.png "
          f"({report['wall_seconds']} s)")  # fmt: skip
    return 0 if all(ok for _, ok in checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitkd.lifecycle_demo", description=__doc__)
    parser.add_argument("--runs", default="runs/lifecycle", help="folder for the run")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
