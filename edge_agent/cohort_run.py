"""A whole cohort run on one device, and its report (``splitkd-edge train --cohort``)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from edge_agent.data import LocalData
from edge_agent.fleet import cohort_report, install_final, run_rounds
from edge_agent.model_store import ModelStore
from edge_agent.run import TrainOptions, _plot, cloud_client, write_report
from edge_agent.telemetry import TrainingTelemetry
from splitkd.classes import class_scores
from splitkd.messages import SessionAsk
from splitkd.models import zoo

log = logging.getLogger(__name__)


def cohort_ask(options: TrainOptions, train_samples: int) -> SessionAsk:
    """What this device asks of its round sessions in a split cohort: the solo flags
    (--wire-codec, --student-cut, --no-teacher-cache) mean the same there."""
    return SessionAsk(
        wire_codec="" if options.wire_codec == "cloud" else options.wire_codec,
        train_samples=0 if options.no_teacher_cache else train_samples,
        student_cut=options.student_cut,
    )


def train_cohort(options: TrainOptions) -> dict[str, Any]:
    started = time.perf_counter()
    telemetry = TrainingTelemetry(options.device_profile, options.link_profile, options.metrics)
    local = LocalData.load(options)
    dataset, split = local.dataset, local.split
    log.info("%s: joining cohort %s", options.device_id, options.cohort)
    with cloud_client(options, telemetry) as client:
        join = client.join_cohort(
            options.device_id,
            options.cohort,
            local.signature,
            len(split.train),
            device_profile=telemetry.device.name,
            link_profile=telemetry.link.name,
            ask=cohort_ask(options, len(split.train)),
            weights_codec="" if options.weights_codec == "cloud" else options.weights_codec,
        )
        log.info(
            "member of cohort %s (%s mode, class %s, %d rounds of %d local epochs)",
            join.cohort,
            join.config.mode,
            join.device_class,
            join.config.rounds,
            join.config.local_epochs,
        )
        local.check_task(join.student_spec.num_classes)
        run = run_rounds(client, join, split, telemetry, options.device_id)
        installed, predictor = install_final(
            client, run, ModelStore(options.model_dir), dataset.signature.input_shape
        )
        traffic = asdict(client.traffic)
    telemetry.finish()
    scores = class_scores(predictor.classes(split.heldout.x), split.heldout.y)
    report = {
        "device_id": options.device_id,
        "device_profile": telemetry.device.name,
        "link_profile": telemetry.link.name,
        "cloud": options.cloud,
        "data": local.report(join.student_spec.num_classes),
        "cohort": cohort_report(run),
        "student": {
            "name": installed.name,
            "version": installed.version,
            **scores.as_report(),
            "parameters": zoo.parameter_count(join.student_spec),
            "spec": join.student_spec.describe(),
            "onnx_sha256": installed.metadata["sha256"],
            "onnx_bytes": installed.metadata["size_bytes"],
            "path": str(installed.path),
        },
        "traffic": traffic,
        "steps": sum(r.steps for r in run.rounds),
        "wall_seconds": time.perf_counter() - started,
        "energy": telemetry.report(),
        "history": [],
        "evaluations": [
            {"step": r.round, "epoch": r.round, "accuracy": r.accuracy} for r in run.rounds
        ],
    }
    write_report(options.report, report)
    log.info(
        "cohort %s: student %s v%d, accuracy %.4f on %d held-out samples",
        join.cohort,
        installed.name,
        installed.version,
        scores.accuracy,
        len(split.heldout),
    )
    if options.plots:
        _plot(options.report, report)
    return report
