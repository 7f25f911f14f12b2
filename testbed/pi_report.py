"""The figures of ``make pi-check`` (scripts/pi_check.sh): collected, rendered, printed.

The script records one figure a line, ``board<TAB>stage<TAB>key<TAB>value``, in
runs/pi-check/results.tsv; ``render`` turns that into report.json, report.md
and the table it prints. ``latency`` times POST /v1/predict against the
emulated Pi's ``splitkd-edge serve`` from this host.

    python -m testbed.pi_report latency URL SAMPLE_JSON N
    python -m testbed.pi_report render runs/pi-check [--note TEXT ...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Results = dict[str, dict[str, dict[str, str]]]

BOARDS = {"pi4": "Raspberry Pi 4", "pi5": "Raspberry Pi 5"}
# (key, column heading) of the printed table, in order; a missing figure prints "-".
COLUMNS = [
    ("cpu", "emulated CPU"),
    ("hwcap_atomics", "LSE"),
    ("install_result", "install"),
    ("install_seconds", "install s"),
    ("venv_mb", "venv MB"),
    ("serve_vmhwm_mb", "serve peak MB"),
    ("memory_limit_mb", "limit MB"),
    ("oom_kills", "OOM kills"),
    ("predict_http_p50_ms", "predict p50 ms"),
    ("predicted_class", "class"),
    ("native_class", "native class"),
    ("train_vmhwm_mb", "train peak MB"),
    ("train_seconds", "train s"),
    ("train_accuracy", "accuracy"),
    ("units_verified", "units"),
]


def parse_results(text: str) -> Results:
    """board -> stage -> key -> value; a later line for the same key wins."""
    results: Results = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"results line {number}: expected 4 tab-separated fields: {line!r}")
        board, stage, key, value = fields
        results.setdefault(board, {}).setdefault(stage, {})[key] = value
    return results


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank: a value that was measured."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = min(max(1, math.ceil(q / 100 * len(ordered))), len(ordered))
    return ordered[rank - 1]


def table(results: Results) -> str:
    """One row per board and stage, fixed-width, for the terminal and the markdown report."""
    headings = ["board", "stage", *(heading for _, heading in COLUMNS)]
    rows = [headings]
    for board in sorted(results):
        for stage in sorted(results[board]):
            figures = results[board][stage]
            rows.append([board, stage, *(figures.get(key, "-") for key, _ in COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(headings))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def render_markdown(results: Results, notes: Sequence[str]) -> str:
    body = [
        "# make pi-check: the edge agent on an emulated Raspberry Pi",
        "",
        "arm64 Debian bookworm in a chroot under qemu-user (`QEMU_CPU` = the board's core).",
        "All times and latencies are **emulated**: qemu translates every instruction, so a real",
        "board is many times faster. Peak memory is qemu's process, translator included.",
        "",
        table(results),
        "",
    ]
    body += [f"- {note}" for note in notes]
    return "\n".join(body).rstrip() + "\n"


def write_report(out_dir: Path, notes: Sequence[str]) -> str:
    """report.json and report.md from results.tsv; returns the table."""
    results = parse_results((out_dir / "results.tsv").read_text())
    report = {"emulated": True, "results": results, "notes": list(notes)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(results, notes))
    return table(results)


def measure_latency(url: str, sample: Any, count: int, timeout: float = 120.0) -> dict[str, str]:
    """POST one sample ``count`` times; round trip and server-side time, in ms."""
    body = json.dumps({"inputs": sample}).encode()
    round_trips: list[float] = []
    server: list[float] = []
    answer: dict[str, Any] = {}
    for _ in range(count):
        request = urllib.request.Request(url, body, {"content-type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
        round_trips.append((time.perf_counter() - started) * 1000)
        server.append(float(answer["seconds"]) * 1000)
    return {
        "predict_http_p50_ms": f"{percentile(round_trips, 50):.1f}",
        "predict_http_p95_ms": f"{percentile(round_trips, 95):.1f}",
        "predict_server_p50_ms": f"{percentile(server, 50):.1f}",
        "predict_mean_ms": f"{statistics.fmean(round_trips):.1f}",
        "predicted_class": str(answer["predictions"][0]["class"]),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m testbed.pi_report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    latency = sub.add_parser("latency", help="time POST /v1/predict; prints 'key value' lines")
    latency.add_argument("url")
    latency.add_argument("sample", help="one sample as a JSON array")
    latency.add_argument("count", type=int)
    render = sub.add_parser(
        "render", help="results.tsv -> report.json, report.md; prints the table"
    )
    render.add_argument("out_dir", type=Path)
    render.add_argument("--note", action="append", default=[], help="a line for the report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "latency":
        if args.count < 1:
            sys.stderr.write("pi_report: count must be at least 1\n")
            return 2
        figures = measure_latency(args.url, json.loads(args.sample), args.count)
        sys.stdout.write("".join(f"{key} {value}\n" for key, value in figures.items()))
        return 0
    try:
        sys.stdout.write(write_report(args.out_dir, args.note) + "\n")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"pi_report: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
