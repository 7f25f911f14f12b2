"""``make plan-check``: the planner's figures on the testbed's shaped links (root).

One cloud and two edges (laptop-x86 on Ethernet, raspberry-pi-4 on LTE) in
network namespaces, as ``make testbed`` builds them. For each edge, one after
the other (so one run's CPU does not slow another's timing):

1. ``splitkd-edge plan --json`` for each objective: the choice on each link;
2. ``splitkd-edge train --plan auto``: the run's report holds what the plan
   predicted beside what the run measured (seconds, joules, bytes);
3. on LTE only, the same training with ``--pipeline-depth 2``: time and accuracy.

It prints, and writes to OUT/plan-check.json: predicted/measured ratios against
the issue's bounds (bytes within 10 %, seconds within 25 %), whether the slow
link's choice differs from the fast one's and by how much that saves, and the
time to the demo's accuracy on LTE against the physical bound (bytes ÷
bandwidth + round trips × RTT + device compute on the critical path).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed import netns
from testbed.run import (
    EMULATOR_BASE_PORT,
    Testbed,
    TestbedError,
    command,
)

log = logging.getLogger("plan-check")
EDGES = ("laptop-x86/ethernet", "raspberry-pi-4/lte")
OBJECTIVES = ("time", "energy", "bytes")
DEMO_ACCURACY = 0.9537  # make demo's distilled students, README
BYTES_TOLERANCE = 0.10
SECONDS_TOLERANCE = 0.25
DIFFERENT_PLAN_SAVING = 0.20
PHYSICAL_BOUND_FACTOR = 1.2


class PlanCheck(Testbed):
    def run(self) -> dict[str, Any]:
        self._clean_outputs()
        teacher = self._teacher()
        self.network.build()
        cloud = self.network.add_host(netns.CLOUD_ROLE)
        hosts = {e.index: self.network.add_host(e.role, e.shaping) for e in self.edges}
        self.start_cloud(cloud, teacher)
        results = {}
        for edge in self.edges:
            address = f"{cloud.address}:{EMULATOR_BASE_PORT + edge.index}"
            results[edge.link] = self._edge(edge, hosts[edge.index], address)
        return {"epochs": self.args.epochs, "links": results}

    def _cli(self, host: netns.Host, name: str, argv: list[str]) -> str:
        log.info("  %s", name)
        done = subprocess.run(
            host.exec([self.python, "-m", "edge_agent.cli", *argv]),
            capture_output=True,
            env=self.env,
            cwd=Path(__file__).resolve().parents[1],
            timeout=self.args.timeout,
            check=False,
        )
        (self.logs / f"{name}.log").parent.mkdir(parents=True, exist_ok=True)
        (self.logs / f"{name}.log").write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            raise TestbedError(f"{name} exited with {done.returncode}:\n" + self.tail(name))
        return done.stdout.decode()

    def _edge(self, edge: Any, host: netns.Host, address: str) -> dict[str, Any]:
        common = {
            "cloud": address,
            "data": self.args.data,
            "shard": f"{edge.index}/{len(self.edges)}",
            "device_profile": edge.device,
            "link_profile": edge.link,
        }
        log.info("%s (%s): plans and training", edge.link, edge.device)
        plans = {
            objective: json.loads(
                self._cli(
                    host,
                    f"plan-{edge.link}-{objective}",
                    command(
                        "plan", "--json", objective=objective, device_id=edge.device_id, **common
                    ),
                )
            )
            for objective in OBJECTIVES
        }
        runs = {"planned": self._train_edge(edge, host, common, "planned", ["--plan", "auto"])}
        if edge.link == "lte":
            choice = runs["planned"]["plan"]["choice"]
            fixed = [
                "--student-cut",
                str(choice["student_cut"]),
                "--teacher-cut",
                str(choice["teacher_cut"]),
                "--wire-codec",
                choice["wire_codec"],
            ]
            runs["pipelined"] = self._train_edge(
                edge, host, common, "pipelined", [*fixed, "--pipeline-depth", "2"]
            )
        return {"device": edge.device, "plans": plans, "runs": runs}

    def _train_edge(
        self, edge: Any, host: netns.Host, common: dict[str, str], name: str, extra: list[str]
    ) -> dict[str, Any]:
        folder = self.out / f"{edge.device_id}-{name}"
        report = folder / "report.json"
        self._cli(
            host,
            f"train-{edge.link}-{name}",
            command(
                "train",
                "--no-progress",
                "--no-plots",
                "--fresh",
                *extra,
                device_id=f"{edge.device_id}-{name}",
                report=report,
                model_dir=folder / "models",
                checkpoint_dir=folder / "checkpoints",
                **common,
            ),
        )
        loaded: dict[str, Any] = json.loads(report.read_text())
        return loaded


# -- figures ----------------------------------------------------------------------


def _ratio(run: dict[str, Any], key: str) -> float:
    plan = run["plan"]
    return float(plan["measured"][key]) / float(plan["predicted"][key])


def time_to_accuracy(report: dict[str, Any], target: float) -> dict[str, Any]:
    """Seconds until the first evaluation at ``target`` (or the best), and the physical
    bound of the same steps: bytes ÷ bandwidth + round trips × RTT + device compute."""
    evaluations = report["evaluations"]
    reached = [e for e in evaluations if e["accuracy"] >= target]
    point = reached[0] if reached else max(evaluations, key=lambda e: e["accuracy"])
    steps = [r for r in report["history"] if r["step"] < point["step"]]
    seconds = sum(
        r["forward_seconds"] + r["network_seconds"] + r["backward_seconds"] for r in steps
    )
    compute = sum(r["forward_seconds"] + r["backward_seconds"] for r in steps)
    up = sum(r["bytes_up"] for r in steps)
    down = sum(r["bytes_down"] for r in steps)
    link = json.loads(
        (Path(__file__).resolve().parents[1] / "splitkd/profiles/links.json").read_text()
    )
    profile = link["links"][report["link_profile"]]
    rates = profile["bandwidth_mbps"]
    rtt = 2 * profile["latency_ms"] / 1e3
    depth = report.get("pipeline", {}).get("depth", 1)
    # With N steps in flight, N round trips overlap: the critical path has steps / N.
    round_trips = len(steps) / depth
    bound = (
        up * 8 / (rates["up"] * 1e6)
        + down * 8 / (rates["down"] * 1e6)
        + round_trips * rtt
        + compute
    )
    return {
        "target": target,
        "reached": bool(reached),
        "accuracy": point["accuracy"],
        "epoch": point["epoch"],
        "steps": len(steps),
        "seconds": seconds,
        "bound_seconds": bound,
        "ratio": seconds / bound if bound else None,
        "final_accuracy": report["student"]["accuracy"],
        "training_seconds": report.get("training_seconds"),
    }


def different_plans(links: dict[str, Any]) -> dict[str, Any]:
    """Per objective: the choice (without a cohort) on each link, and what the slow link's
    choice saves over the fast link's choice, both predicted on the slow link."""
    out = {}
    fast, slow = links["ethernet"]["plans"], links["lte"]["plans"]
    for objective in OBJECTIVES:
        fast_choice = fast[objective]["choice_alone"]["name"]
        slow_plan = slow[objective]
        slow_choice = slow_plan["choice_alone"]
        key = {"time": "seconds", "energy": "joules", "bytes": "bytes"}[objective]
        on_slow = {c["name"]: c["predicted"][key] for c in slow_plan["candidates"]}
        saving = 1 - slow_choice["predicted"][key] / on_slow[fast_choice]
        out[objective] = {
            "ethernet": fast_choice,
            "lte": slow_choice["name"],
            "different": fast_choice != slow_choice["name"],
            "saving_on_lte": saving,
            "with_cohort": {
                "ethernet": fast[objective]["choice"]["name"],
                "lte": slow_plan["choice"]["name"],
            },
        }
    return out


def figures(result: dict[str, Any]) -> dict[str, Any]:
    links = result["links"]
    accuracy = {}
    for link, data in links.items():
        accuracy[link] = {
            name: {
                "bytes_ratio": _ratio(run, "bytes") if "plan" in run else None,
                "seconds_ratio": _ratio(run, "seconds") if "plan" in run else None,
                "joules_ratio": _ratio(run, "joules") if "plan" in run else None,
                "choice": run["plan"]["choice"]["name"] if "plan" in run else None,
                "accuracy": run["student"]["accuracy"],
                "training_seconds": run.get("training_seconds"),
            }
            for name, run in data["runs"].items()
        }
    lte = links["lte"]["runs"]
    return {
        "prediction": accuracy,
        "plans": different_plans(links),
        "lte_time_to_accuracy": {
            name: time_to_accuracy(run, DEMO_ACCURACY) for name, run in lte.items()
        },
    }


def verdicts(found: dict[str, Any]) -> list[str]:
    lines = []
    for link, runs in found["prediction"].items():
        planned = runs["planned"]
        for key, tolerance in (
            ("bytes_ratio", BYTES_TOLERANCE),
            ("seconds_ratio", SECONDS_TOLERANCE),
        ):
            ratio = planned[key]
            ok = abs(ratio - 1) <= tolerance
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {link}: measured/predicted {key.split('_')[0]} "
                f"{ratio:.3f} (within {tolerance:.0%}); plan {planned['choice']}"
            )
    for objective, plan in found["plans"].items():
        saving = plan["saving_on_lte"]
        # A choice that would save >= 20 % on the slow link must not be left untaken.
        ok = plan["different"] or saving < DIFFERENT_PLAN_SAVING
        lines.append(
            f"{'PASS' if ok else 'FAIL'} {objective}: ethernet -> {plan['ethernet']}, lte -> "
            f"{plan['lte']}; the LTE choice saves {saving:.1%} on LTE"
        )
    for name, figure in found["lte_time_to_accuracy"].items():
        ratio = figure["ratio"]
        ok = ratio is not None and ratio <= PHYSICAL_BOUND_FACTOR
        lines.append(
            f"{'PASS' if ok else 'FAIL'} lte {name}: {figure['seconds']:.1f} s to accuracy "
            f"{figure['accuracy']:.4f} (target {figure['target']}, "
            f"{'reached' if figure['reached'] else 'not reached: best'}) vs physical bound "
            f"{figure['bound_seconds']:.1f} s: {ratio:.2f}x (bound {PHYSICAL_BOUND_FACTOR}x); "
            f"final accuracy {figure['final_accuracy']:.4f}"
        )
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m testbed.plan_check", description=__doc__)
    parser.add_argument(
        "--epochs", type=int, default=60, help="epochs per run (default 60, the demo's)"
    )
    parser.add_argument("--data", default="digits")
    parser.add_argument("--teacher-data", default="digits")
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("runs/plan-check"))
    parser.add_argument("--prefix", default=None)
    parser.add_argument("--subnet", default="10.78.0")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per edge command")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("-v", "--verbose", action="count", default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    from splitkd.logs import configure

    args = _parser().parse_args(argv)
    configure(args.verbose)
    reason = netns.available()
    if reason is not None:
        log.error("cannot build a testbed: %s", reason)
        return 2
    args.prefix = args.prefix or f"skp{os.getpid()}"
    args.edge, args.serve_edge = list(EDGES), -1
    try:
        bed = PlanCheck(args)
    except (TestbedError, netns.NetnsError) as exc:
        log.error("%s", exc)
        return 2
    atexit.register(bed.teardown)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    started = time.monotonic()
    try:
        result = bed.run()
    except (TestbedError, netns.NetnsError, OSError, subprocess.SubprocessError) as exc:
        log.error("plan-check failed: %s", exc)
        return 1
    finally:
        bed.teardown()
    found = figures(result)
    lines = verdicts(found)
    path = args.out / "plan-check.json"
    path.write_text(
        json.dumps(
            {**found, "raw": result, "verdicts": lines, "wall_seconds": time.monotonic() - started},
            indent=2,
        )
    )
    sys.stdout.write("\n".join(lines) + f"\n  report: {path}\n")
    return 0 if all(line.startswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
