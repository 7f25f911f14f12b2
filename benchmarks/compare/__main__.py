"""``make compare``: splitkd and Flower FedAvg on the same shards, the same student, on loopback.

Every system runs each scenario with each seed as separate processes; every
device talks to its server through its own byte-counting relay, so bytes are
counted on the socket alike for all. Prints a table, writes
``runs/compare/report.json`` and ``runs/compare/compare.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.compare import flower, report
from benchmarks.compare.processes import RunFailed
from benchmarks.compare.scenarios import SCENARIOS, prepare
from benchmarks.compare.systems import DEFAULT_SYSTEMS, SYSTEMS, applies


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__)
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=DEFAULT_SYSTEMS)
    parser.add_argument(
        "--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS)
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="averaged (default 0 1 2)"
    )
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds (default 20)")
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=3,
        help="local epochs per round (default 3: rounds x local epochs = the split demo's 60 epochs)",
    )
    parser.add_argument(
        "--flower-evaluate",
        choices=["final", "every-round"],
        default="final",
        help="Flower: send the model for evaluation after the last round only (default; each device "
        "still ends with the final model) or after every round (FedAvg's stock behaviour: one more "
        "model download per round)",
    )
    parser.add_argument(
        "--weights-codec",
        choices=["int8-delta", "float32"],
        default="",
        help="splitkd's federated cohorts: how the weights travel (default: serve's default, "
        "int8-delta; docs/FLEETS.md)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds < 1 or args.local_epochs < 1:
        print("error: --rounds and --local-epochs must be >= 1", file=sys.stderr)
        return 2
    run_dir = args.out / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }
    if "flower-fedavg" in args.systems:
        python = flower.ensure_venv()
        config["flower"] = {"version": flower.flower_version(python), "transport": flower.TRANSPORT}
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    for scenario_name in args.scenarios:
        for seed in args.seeds:
            ctx = prepare(
                SCENARIOS[scenario_name],
                seed,
                run_dir / f"{scenario_name}-seed{seed}",
                args.rounds,
                args.local_epochs,
            )
            ctx.options["flower_evaluate"] = args.flower_evaluate
            ctx.options["weights_codec"] = args.weights_codec
            for system in args.systems:
                if not applies(system, ctx.scenario):
                    print(f"{scenario_name}: {system} skipped (standard devices only)", flush=True)
                    continue
                print(f"{scenario_name} seed {seed}: {system}…", flush=True)
                try:
                    result = SYSTEMS[system](ctx)
                except RunFailed as exc:
                    print(f"error: {system} on {scenario_name} seed {seed}: {exc}", file=sys.stderr)
                    return 1
                runs.append(
                    {"system": system, "scenario": scenario_name, "seed": seed, **asdict(result)}
                )
                _write(args.out, run_dir, config, runs, time.monotonic() - started)
    rows = _write(args.out, run_dir, config, runs, time.monotonic() - started)
    print()
    print(report.table(rows))
    if "flower" in config:
        print(f"\nFlower {config['flower']['version']}, {config['flower']['transport']}")
    png = report.plot(rows, args.out / "compare.png")
    print(f"report: {args.out / 'report.json'}" + (f", plot: {png}" if png else ""))
    return 0


def _write(
    out: Path, run_dir: Path, config: dict[str, Any], runs: list[dict[str, Any]], seconds: float
) -> list[dict[str, Any]]:
    """report.json in the run folder and at ``out`` (rewritten after every run: a long
    benchmark interrupted keeps what it measured)."""
    rows = report.summarise(runs)
    text = json.dumps(
        {
            "config": config,
            "summary": rows,
            "runs": runs,
            "wall_seconds": seconds,
            "run_dir": str(run_dir),
        },
        indent=2,
    )
    (run_dir / "report.json").write_text(text)
    (out / "report.json").write_text(text)
    return rows


if __name__ == "__main__":
    sys.exit(main())
