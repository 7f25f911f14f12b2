"""``splitkd-edge plan``: choose how to train from this device and its real link.

Asks the cloud what it would train (``Describe``), measures this device's
compute at each allowed cut (``plan_measure``) and the link (``Probe``), predicts
seconds, device joules and bytes for every candidate (``plan_model``) and picks
the best for the objective. ``train --plan auto`` trains with that choice and
records the prediction beside what the run then measured.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from edge_agent.data import LocalData
from edge_agent.plan_measure import calibrate, measure_device, measure_link
from edge_agent.plan_model import (
    Candidate,
    DeviceFigures,
    LinkFigures,
    Prediction,
    Workload,
    candidates,
    choose,
    predict,
)
from edge_agent.settings import OBJECTIVES
from splitkd import energy
from splitkd.errors import InvalidArgument

if TYPE_CHECKING:
    from edge_agent.client import CloudClient
    from edge_agent.run import TrainOptions

log = logging.getLogger(__name__)


@dataclass
class Plan:
    objective: str
    workload: Workload
    device: DeviceFigures
    link: LinkFigures
    predictions: list[tuple[Candidate, Prediction]]
    choice: tuple[Candidate, Prediction]  # over every candidate
    alone: tuple[Candidate, Prediction]  # over what trains without a cohort

    def as_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "workload": {
                "train_samples": self.workload.train_samples,
                "heldout_samples": self.workload.heldout_samples,
                "epochs": self.workload.hyper.epochs,
                "batch_size": self.workload.hyper.batch_size,
                "teacher_cache": self.workload.cached,
            },
            "link": {
                "rtt_ms": self.link.rtt * 1e3,
                "up_mbps": self.link.up_bytes_per_second * 8e-6,
                "down_mbps": self.link.down_bytes_per_second * 8e-6,
            },
            "device": {
                f"student_cut_{cut}": _stage(stage) for cut, stage in self.device.student.items()
            }
            | {f"teacher_cut_{cut}": _stage(stage) for cut, stage in self.device.teacher.items()}
            | {
                # The cloud's own step timed here: teacher side cached, and sent.
                f"cloud_step_cut_{cut}_{name}": {"cached_ms": t[0] * 1e3, "sent_ms": t[1] * 1e3}
                for (cut, name), t in self.device.cloud_seconds.items()
            },
            "candidates": [_candidate(c, p) for c, p in self.predictions],
            "choice": _candidate(*self.choice),
            "choice_alone": _candidate(*self.alone),
        }


def _stage(stage: Any) -> dict[str, Any]:
    return {
        "forward_ms": stage.forward * 1e3,
        "backward_ms": stage.backward * 1e3,
        "cloud_ms": stage.tail_seconds * 1e3,
        "activation_shape": list(stage.activation_shape),
        "peak_memory_bytes": stage.peak_memory_bytes,
    }


def _candidate(candidate: Candidate, prediction: Prediction) -> dict[str, Any]:
    return {
        "name": candidate.name,
        **asdict(candidate),
        "runnable_alone": candidate.runnable_alone,
        "predicted": prediction.as_dict(),
    }


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise InvalidArgument(
            f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}"
        )
    return objective


def make_plan(client: CloudClient, local: LocalData, options: TrainOptions, objective: str) -> Plan:
    check_objective(objective)
    task = client.describe(local.signature)
    hyper = task.hyper.with_epochs(options.epochs)
    workload = Workload(
        train_samples=len(local.split.train),
        heldout_samples=len(local.split.heldout),
        hyper=hyper,
        student_spec=task.student_spec,
        teacher_spec=task.teacher_spec,
        teacher_cut=options.teacher_cut or task.default_teacher_cut,
        cache_samples=0 if options.no_teacher_cache else task.teacher_cache_samples,
        eval_every=max(1, getattr(options, "eval_every", 1)),
    )
    log.info("plan: timing the heads at cuts %s on this device", list(task.student_cuts))
    device = measure_device(task, hyper, workload.teacher_cut)
    link = measure_link(client)
    log.info("plan: timing the cloud's side of a step at cuts %s", list(task.student_cuts))
    device = calibrate(
        client, local.signature, options.device_id, task, hyper, workload.teacher_cut, link, device
    )
    log.info(
        "plan: link RTT %.1f ms, up %.1f / down %.1f Mbit/s",
        link.rtt * 1e3,
        link.up_bytes_per_second * 8e-6,
        link.down_bytes_per_second * 8e-6,
    )
    profile = (
        energy.device_profile(options.device_profile or energy.DEFAULT_DEVICE),
        energy.link_profile(options.link_profile or energy.DEFAULT_LINK),
    )
    predictions = [
        (c, predict(c, workload, device, link, profile))
        for c in candidates(workload, device, task.wire_codecs)
    ]
    return Plan(
        objective,
        workload,
        device,
        link,
        predictions,
        choose(predictions, objective),
        choose(predictions, objective, alone=True),
    )


def apply(plan: Plan, options: TrainOptions) -> TrainOptions:
    """``options`` asking the cloud for the plan's split choice (cut and codec)."""
    candidate = plan.alone[0]
    if plan.choice[0] != candidate:
        log.info(
            "plan: %s would be cheaper but needs a cohort; training with %s",
            plan.choice[0].name,
            candidate.name,
        )
    return replace(
        options,
        student_cut=candidate.student_cut,
        teacher_cut=candidate.teacher_cut,
        wire_codec=candidate.wire_codec,
    )


def compare(plan: Plan, report: dict[str, Any], loop_seconds: float) -> dict[str, Any]:
    """The run report's ``plan`` section: predicted and measured side by side."""
    candidate, prediction = plan.alone
    traffic = report["traffic"]
    measured = {
        "seconds": loop_seconds,
        "joules": report["energy"]["estimate_joules"]["total"],
        "bytes": traffic["bytes_up"] + traffic["bytes_down"],
        "bytes_up": traffic["bytes_up"],
        "bytes_down": traffic["bytes_down"],
    }
    predicted = prediction.as_dict()
    return {
        "objective": plan.objective,
        "choice": _candidate(candidate, prediction),
        "predicted": predicted,
        "measured": measured,
        "ratio": {
            key: measured[key] / predicted[key] if predicted[key] else None
            for key in ("seconds", "joules", "bytes")
        },
        "link": plan.as_dict()["link"],
        "candidates": [_candidate(c, p) for c, p in plan.predictions],
    }


def table(plan: Plan) -> str:
    link = plan.link
    lines = [
        f"link: RTT {link.rtt * 1e3:.1f} ms, up {link.up_bytes_per_second * 8e-6:.2f} Mbit/s, "
        f"down {link.down_bytes_per_second * 8e-6:.2f} Mbit/s; "
        f"{plan.workload.train_samples} samples x {plan.workload.hyper.epochs} epochs, "
        f"teacher cache {'on' if plan.workload.cached else 'off'}",
        f"{'candidate':<28} {'seconds':>9} {'joules':>9} {'MB':>8} {'epoch s':>8} {'epoch KB':>9}",
    ]
    for candidate, p in plan.predictions:
        mark = (
            " <"
            if candidate == plan.choice[0]
            else ("  (alone)" if candidate == plan.alone[0] else "")
        )
        lines.append(
            f"{candidate.name:<28} {p.seconds:>9.2f} {p.joules:>9.2f} {p.bytes / 1e6:>8.3f} "
            f"{p.epoch_seconds:>8.3f} {p.epoch_bytes / 1e3:>9.1f}{mark}"
        )
    choice, alone = plan.choice[0], plan.alone[0]
    lines.append(f"choice for {plan.objective}: {choice.name}")
    if alone != choice:
        lines.append(f"without a cohort (train --plan auto): {alone.name}")
    return "\n".join(lines)


def plan_client(options: TrainOptions) -> CloudClient:
    """A client of its own: the probes' bytes are not the run's."""
    from edge_agent.client import CloudClient
    from edge_agent.security import EdgeSecurity

    security = options.security or EdgeSecurity()
    return CloudClient(
        options.cloud,
        timeout=options.timeout,
        connect_timeout=min(10.0, options.timeout),
        retry_seconds=options.retry_seconds,
        credentials=security.channel_credentials(),
        metadata=security.call_metadata(options.device_id),
    )


def plan_for(options: TrainOptions, local: LocalData) -> Plan:
    with plan_client(options) as client:
        plan = make_plan(client, local, options, options.objective)
        log.info(
            "plan: %d bytes of probes and Describe (not counted in the run)",
            client.traffic.bytes_up + client.traffic.bytes_down,
        )
    return plan


def plan_command(options: TrainOptions, objective: str, *, as_json: bool) -> str:
    """What ``splitkd-edge plan`` prints."""
    import json

    check_objective(objective)
    plan = plan_for(replace(options, objective=objective), LocalData.load(options))
    return json.dumps(plan.as_dict(), indent=2) if as_json else table(plan)
