"""A whole cohort run on one device, and its report (``splitkd-edge train --cohort``)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from edge_agent.client import CloudClient
from edge_agent.fleet import cohort_report, install_final, run_rounds
from edge_agent.model_store import ModelStore
from edge_agent.run import TrainOptions, _plot, write_report
from edge_agent.security import EdgeSecurity
from edge_agent.telemetry import TrainingTelemetry
from splitkd.data import edge_split, load_dataset
from splitkd.models import zoo

log = logging.getLogger(__name__)


def train_cohort(options: TrainOptions) -> dict[str, Any]:
    started = time.perf_counter()
    telemetry = TrainingTelemetry(options.device_profile, options.link_profile, options.metrics)
    dataset = load_dataset(options.data)
    split = edge_split(
        dataset,
        options.shard,
        alpha=options.dirichlet_alpha,
        presumed_fraction=options.presumed_fraction,
    )
    log.info(
        "%s: %d training and %d held-out samples, joining cohort %s",
        options.device_id,
        len(split.train),
        len(split.heldout),
        options.cohort,
    )
    security = options.security or EdgeSecurity()
    with CloudClient(
        options.cloud,
        timeout=options.timeout,
        retry_seconds=options.retry_seconds,
        credentials=security.channel_credentials(),
        metadata=security.call_metadata(options.device_id),
    ) as client:
        client.on_traffic = telemetry.on_traffic
        join = client.join_cohort(
            options.device_id,
            options.cohort,
            dataset.signature,
            len(split.train),
            device_profile=telemetry.device.name,
            link_profile=telemetry.link.name,
        )
        log.info(
            "member of cohort %s (%s mode, class %s, %d rounds of %d local epochs)",
            join.cohort,
            join.config.mode,
            join.device_class,
            join.config.rounds,
            join.config.local_epochs,
        )
        run = run_rounds(client, join, split, telemetry)
        local, predictor = install_final(
            client, run, ModelStore(options.model_dir), dataset.signature.input_shape
        )
        traffic = asdict(client.traffic)
    telemetry.finish()
    accuracy = predictor.accuracy(split.heldout.x, split.heldout.y)
    report = {
        "device_id": options.device_id,
        "device_profile": telemetry.device.name,
        "link_profile": telemetry.link.name,
        "cloud": options.cloud,
        "data": {
            "spec": options.data,
            "shard": str(options.shard) if options.shard else "0/1",
            "signature": dataset.signature.describe(),
            "train_samples": len(split.train),
            "heldout_samples": len(split.heldout),
        },
        "cohort": cohort_report(run),
        "student": {
            "name": local.name,
            "version": local.version,
            "accuracy": accuracy,
            "parameters": zoo.parameter_count(join.student_spec),
            "spec": join.student_spec.describe(),
            "onnx_sha256": local.metadata["sha256"],
            "onnx_bytes": local.metadata["size_bytes"],
            "path": str(local.path),
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
        local.name,
        local.version,
        accuracy,
        len(split.heldout),
    )
    if options.plots:
        _plot(options.report, report)
    return report
