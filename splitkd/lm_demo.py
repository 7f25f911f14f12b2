"""``make lm-demo``: split distillation of a transformer teacher into an on-device language model.

A ``splitkd-cloud serve`` process trains a byte-level transformer teacher on its
presumed share of the built-in corpus (the Python documentation's topics, which
every Python has: no download), then two ``splitkd-edge train`` processes
distil it over gRPC into a student ~10x smaller, each on its own share of the
text (which never leaves the edge process: only block activations do). The same
student trained alone on each edge's text is the baseline. Then each edge's ONNX
student generates text with its key/value cache, timed against recomputing the
whole window for every token.

Prints a table and writes ``runs/lm/<stamp>/report.json`` (``runs/lm/latest``)
with a loss plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from splitkd.demo import DEMO_PROFILES, free_port, point_latest, wait_healthy

DATA = "pydoc-topics"
PRESUMED_FRACTION = 0.4
# The edges' text is split in EDGE_SHARDS shares and the demo's edges take the first
# ones: a device holds little text of its own, the case distillation is for.
EDGE_SHARDS = 4
# Measured on 2 cores (README, "Language models"): these settings distil with a
# margin and keep the whole demo within a few minutes.
SESSION = {
    "--epochs": "16",
    "--learning-rate": "0.005",
    "--batch-size": "24",
    "--kd-alpha": "0.7",
    "--kd-temperature": "1.0",
}
CONTINUATION = 128
PROMPT = "The import statement"


def student_alone(edge_report: dict[str, Any], shard: str) -> tuple[float, list[float]]:
    """The same student and hyperparameters on the same text, no teacher: held-out
    perplexity and its cross-entropy per step (the plot's baseline)."""
    import torch

    from splitkd.data import edge_split, load_dataset, parse_shard
    from splitkd.hyper import Hyperparameters
    from splitkd.models.spec import ModelSpec
    from splitkd.training import train_supervised

    torch.set_num_threads(1)
    session = edge_report["session"]
    spec = ModelSpec.from_json(
        session["student_model"]["family"], session["student_model"]["spec_json"]
    )
    split = edge_split(load_dataset(DATA), parse_shard(shard), presumed_fraction=PRESUMED_FRACTION)
    losses: list[float] = []
    model = train_supervised(
        spec,
        split.train,
        Hyperparameters(**session["hyperparameters"]),
        progress=lambda _step, loss: losses.append(loss),
    )
    return perplexity(model, split.heldout.x, split.heldout.y), losses


def perplexity(model: Any, x: Any, y: Any) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1)
        )
    return math.exp(float(loss))


def full_context_prompt(context: int) -> str:
    """The Python documentation's prose on ``import``, cut to fill the model's whole context."""
    from pydoc_data.topics import topics

    text = topics["import"]
    start = max(0, text.find("The basic import statement"))
    return text[start:].encode()[:context].decode("utf-8", errors="ignore")


def _speeds(generator: Any, prompt: str, repeats: int) -> dict[str, float]:
    """Best tokens/s of ``repeats`` runs, with the cache and by recomputing the window for
    every token: other processes on a shared machine only ever slow a run down."""
    cached, first_token, recompute = 0.0, math.inf, 0.0
    for _ in range(repeats):
        for _token in generator.tokens(prompt, CONTINUATION):
            pass
        cached = max(cached, generator.stats.tokens_per_second)
        first_token = min(first_token, generator.stats.first_token_seconds)
        started = time.perf_counter()
        for _token in generator.recompute_tokens(prompt, CONTINUATION):
            pass
        recompute = max(recompute, CONTINUATION / (time.perf_counter() - started))
    return {
        "prompt_tokens": len(prompt.encode()),
        "tokens_per_second": cached,
        "first_token_ms": first_token * 1000,
        "recompute_tokens_per_second": recompute,
        "cache_speedup": cached / recompute,
    }


def generation_speed(onnx_path: Path, repeats: int = 3) -> dict[str, Any]:
    """A CONTINUATION-token continuation after a full-context prompt (recomputing means the
    whole context for every token: the issue's figure) and after the short PROMPT."""
    from edge_agent.generate import Generator

    generator = Generator(onnx_path)
    full = _speeds(generator, full_context_prompt(generator.context), repeats)
    short = _speeds(generator, PROMPT, repeats)
    # Greedy decoding of a small byte model loops on frequent words; a sample reads better.
    text = "".join(generator.text(PROMPT, CONTINUATION, temperature=0.7, seed=0))
    return {"prompt": PROMPT, "continuation": text, "tokens": CONTINUATION, **full,
            "short_prompt": short}  # fmt: skip


def wire_per_token(edge_report: dict[str, Any]) -> dict[str, float]:
    """Bytes on the wire per training token, as measured with the session's codec (the
    teacher's side goes up once per window: the cloud's teacher-output cache)."""
    history = edge_report["history"]
    tokens = sum(h["batch"] for h in history) * edge_report["context"]
    return {"measured": sum(h["bytes_up"] + h["bytes_down"] for h in history) / max(1, tokens)}


def _cloud(args: argparse.Namespace, run_dir: Path, grpc_port: int, http_port: int) -> Any:
    command = [
        sys.executable, "-m", "cloud_service.cli", "serve", "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--teacher-data", DATA, "--presumed-fraction", str(PRESUMED_FRACTION),
        "--state-dir", str(run_dir / "cloud"), "--seed", str(args.seed),
        *[item for pair in SESSION.items() for item in pair],
    ]  # fmt: skip
    log = (run_dir / "cloud.log").open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _edge(run_dir: Path, grpc_port: int, index: int, codec: str) -> tuple[str, str, Any]:
    device, shard = f"edge-{index}", f"{index}/{EDGE_SHARDS}"
    profile, link = DEMO_PROFILES[index % len(DEMO_PROFILES)]
    command = [
        sys.executable, "-m", "edge_agent.cli", "train", "--cloud", f"127.0.0.1:{grpc_port}",
        "--data", DATA, "--shard", shard, "--presumed-fraction", str(PRESUMED_FRACTION),
        "--device-id", device, "--report", str(run_dir / f"{device}.json"),
        "--model-dir", str(run_dir / device / "models"), "--no-progress", "--no-plots",
        "--checkpoint-dir", str(run_dir / device / "checkpoints"),
        "--device-profile", profile, "--link-profile", link, "--wire-codec", codec,
    ]  # fmt: skip
    log = (run_dir / f"{device}.log").open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return device, shard, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _edge_summary(run_dir: Path, device: str, shard: str, teacher: Any) -> dict[str, Any]:
    from splitkd.data import edge_split, load_dataset, parse_shard
    from splitkd.models import zoo
    from splitkd.models.spec import ModelSpec

    report = json.loads((run_dir / f"{device}.json").read_text())
    session = report["session"]
    student_spec = ModelSpec.from_json(
        session["student_model"]["family"], session["student_model"]["spec_json"]
    )
    cut_widths = (
        zoo.activation_shape(student_spec, session["student_cut"])[-1],
        zoo.activation_shape(teacher.spec, session["teacher_cut"])[-1],
        zoo.activation_shape(student_spec, session["student_cut"])[-1],
    )
    report["context"], report["cut_widths"] = student_spec.input_shape[0], cut_widths
    split = edge_split(load_dataset(DATA), parse_shard(shard), presumed_fraction=PRESUMED_FRACTION)
    alone, alone_losses = student_alone(report, shard)
    return {
        "shard": shard,
        "student": {
            "parameters": report["student"]["parameters"],
            "perplexity": report["student"]["perplexity"],
            "accuracy": report["student"]["accuracy"],
        },
        "student_alone": {"perplexity": alone},
        "teacher_perplexity": perplexity(teacher.model, split.heldout.x, split.heldout.y),
        "samples": {"train": len(split.train), "heldout": len(split.heldout)},
        "wire_bytes_per_token": wire_per_token(report),
        "generation": generation_speed(Path(report["student"]["path"])),
        "steps": report["steps"],
        "wall_seconds": report["wall_seconds"],
        "_curves": {
            "distilled": [h["ce_loss"] for h in report["history"]],
            "alone": alone_losses,
        },
    }


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = Path(args.runs)
    run_dir = runs / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = point_latest(runs / "latest", stamp) or run_dir
    grpc_port, http_port = free_port(), free_port()
    print(f"splitkd lm-demo: run folder {run_dir}")
    cloud = _cloud(args, run_dir, grpc_port, http_port)
    edges: list[tuple[str, str, Any]] = []
    try:
        print("[1/4] cloud: training a transformer teacher on its presumed share of the text…")
        health = wait_healthy(f"http://127.0.0.1:{http_port}/healthz", cloud, run_dir / "cloud.log")
        print(
            f"      teacher {health['teacher']['spec']}: {health['teacher']['parameters']:,} parameters"
        )
        print("[2/4] two edges: token-level split KD over gRPC (their text stays on the edge)…")
        edges = [_edge(run_dir, grpc_port, i, args.wire_codec) for i in range(2)]
        for device, _, process in edges:
            if process.wait() != 0:
                print(f"error: {device} failed; see {run_dir / (device + '.log')}", file=sys.stderr)
                return 1
    finally:
        for _, _, process in edges:
            if process.poll() is None:
                process.kill()
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(10)
        except subprocess.TimeoutExpired:
            cloud.kill()
    from cloud_service.teacher import Teacher

    teacher = Teacher.load(run_dir / "cloud" / "teacher.safetensors")
    print("[3/4] baseline: the same student trained alone on each edge's text; ONNX generation…")
    per_edge = {
        device: _edge_summary(run_dir, device, shard, teacher) for device, shard, _ in edges
    }
    curves = {device: summary.pop("_curves") for device, summary in per_edge.items()}
    summary = {
        "teacher": {"parameters": teacher.parameters, "spec": teacher.spec.describe(),
                    "accuracy": teacher.accuracy},
        "edges": per_edge,
        "session": SESSION,
        "wire_codec": args.wire_codec,
        "wall_seconds": time.monotonic() - started,
        "run_dir": str(run_dir),
    }  # fmt: skip
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
    print("[4/4] plot…")
    _plot(run_dir, curves)
    _table(summary)
    print(f"report: {latest / 'report.json'}")
    return 0


def _plot(run_dir: Path, curves: dict[str, dict[str, list[float]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("      (no plot: the [plots] extra, matplotlib, is not installed)")
        return
    fig, axis = plt.subplots(figsize=(7, 4))
    for device, series in curves.items():
        for name, values in series.items():
            style = "-" if name == "distilled" else "--"
            axis.plot(values, style, label=f"{device} {name}")
    axis.set(title="cross-entropy on the next byte, per training step", xlabel="step",
             ylabel="CE (nats)")  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"      {path}")


def _table(summary: dict[str, Any]) -> None:
    teacher = summary["teacher"]
    header = ("device", "params", "ppl distilled", "ppl alone", "gain", "ppl teacher",
              "wire B/token", "tokens/s", "recompute", "first token")  # fmt: skip
    rows = [header]
    for device, edge in summary["edges"].items():
        student, alone = edge["student"]["perplexity"], edge["student_alone"]["perplexity"]
        generation = edge["generation"]
        rows.append((
            device, f"{edge['student']['parameters']:,}", f"{student:.3f}", f"{alone:.3f}",
            f"{100 * (alone - student) / alone:.1f}%", f"{edge['teacher_perplexity']:.3f}",
            f"{edge['wire_bytes_per_token']['measured']:.0f}",
            f"{generation['tokens_per_second']:.0f}",
            f"{generation['recompute_tokens_per_second']:.0f}",
            f"{generation['first_token_ms']:.1f} ms",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    students = [e["student"]["parameters"] for e in summary["edges"].values()]
    first = next(iter(summary["edges"].values()))
    wire, generation = first["wire_bytes_per_token"], first["generation"]
    print(
        f"\n  teacher {teacher['parameters']:,} parameters = {teacher['parameters'] / max(students):.1f}x "
        f"the student; perplexity on held-out text of each device (lower is better)\n"
        f"  wire per training token: {wire['measured']:.0f} B measured with the "
        f"{summary['wire_codec']} codec, the teacher's side sent once per window (cache)\n"
        f"  generation ({generation['tokens']} tokens, onnxruntime): key/value cache "
        f"{generation['cache_speedup']:.1f}x the tokens/s of recomputing the whole context "
        f"after a {generation['prompt_tokens']}-byte prompt "
        f"({generation['short_prompt']['cache_speedup']:.1f}x after {generation['prompt']!r})\n"
        f"  {first['generation']['prompt']!r} -> {first['generation']['continuation'][:80]!r}\n"
        f"  whole demo: {summary['wall_seconds']:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitkd.lm_demo", description=__doc__)
    parser.add_argument("--seed", type=int, default=1, help="training seed (default 1)")
    parser.add_argument(
        "--wire-codec",
        default="int8",
        choices=("float32", "float16", "int8", "int8-stochastic", "topk"),
        help="codec of the edges' activations and gradients (default int8: README, "
        "'Language models', measures it against float32)",
    )
    parser.add_argument("--runs", default="runs/lm", help="folder for run outputs (runs/lm)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
