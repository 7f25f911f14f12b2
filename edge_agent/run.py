"""``splitkd-edge train``: register, split-train, finish, download, verify, evaluate, report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_agent.client import CloudClient
from edge_agent.inference import Predictor
from edge_agent.metrics import EdgeMetrics
from edge_agent.model_store import ModelStore
from edge_agent.telemetry import TrainingTelemetry
from edge_agent.trainer import EdgeTrainer, EvalRecord, GrpcTransport, StepRecord
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import Shard
from splitkd.models import zoo
from splitkd.v1 import splitkd_pb2 as pb

log = logging.getLogger(__name__)
_WIRE = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}


@dataclass
class TrainOptions:
    cloud: str
    data: str
    shard: Shard | None
    device_id: str
    report: Path
    model_dir: Path
    epochs: int = 0
    dirichlet_alpha: float | None = None
    presumed_fraction: float = 0.4
    device_profile: str = ""
    link_profile: str = ""
    progress: bool = True
    timeout: float = 60.0
    metrics: EdgeMetrics | None = None
    plots: bool = True


def train(
    options: TrainOptions,
    on_step: Callable[[StepRecord], None] | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    telemetry = TrainingTelemetry(options.device_profile, options.link_profile, options.metrics)
    if options.metrics is not None:
        options.metrics.describe_device(
            options.device_id, telemetry.device.name, telemetry.link.name
        )
    dataset = load_dataset(options.data)
    split = edge_split(
        dataset,
        options.shard,
        alpha=options.dirichlet_alpha,
        presumed_fraction=options.presumed_fraction,
    )
    log.info(
        "%s: %d training and %d held-out samples (%s)",
        options.device_id,
        len(split.train),
        len(split.heldout),
        dataset.signature.describe(),
    )
    with CloudClient(options.cloud, timeout=options.timeout) as client:
        client.on_traffic = telemetry.on_traffic
        session = client.register(
            options.device_id,
            dataset.signature,
            requested_epochs=options.epochs,
            device_profile=telemetry.device.name,
            link_profile=telemetry.link.name,
        )
        transport = GrpcTransport(client, session.session_id, _WIRE[session.hyper.wire_dtype])
        trainer = EdgeTrainer(session, split.train, split.heldout, transport)
        bar = _progress(trainer.total_steps, options)
        last_eval: list[EvalRecord] = []

        def step_done(record: StepRecord) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record.loss:.3f}", refresh=False)
            telemetry.on_step(record)
            if on_step is not None:
                on_step(record)

        def on_eval(record: EvalRecord) -> None:
            last_eval.append(record)
            telemetry.on_eval(record)

        def traffic() -> tuple[int, int]:
            return client.traffic.bytes_up, client.traffic.bytes_down

        try:
            result = trainer.run(on_step=step_done, on_eval=on_eval, traffic=traffic)
        finally:
            if bar is not None:
                bar.close()
        info = client.finish(session.session_id, trainer.head_state(), result.steps)
        store = ModelStore(options.model_dir)
        download = options.model_dir / f".{info.name}-{info.version}.download"
        client.download(info.name, info.version, download, expected_sha256=info.sha256)
        metadata = {
            "name": info.name,
            "version": info.version,
            "sha256": info.sha256,
            "size_bytes": info.size_bytes,
            "parameters": info.parameters,
            "max_abs_diff": info.max_abs_diff,
            "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
            "created_at": info.created_at,
        }
        local = store.install(info.name, info.version, download, metadata)
        traffic_totals = asdict(client.traffic)
    telemetry.finish()
    predictor = Predictor(local.path, dataset.signature.input_shape)
    accuracy = predictor.accuracy(split.heldout.x, split.heldout.y)
    steps = max(1, len(result.history))
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
        "session": {
            "student_cut": session.student_cut,
            "teacher_cut": session.teacher_cut,
            "student_spec": session.student_spec.describe(),
            "teacher_spec": session.teacher_spec.describe(),
            "student_model": {
                "family": session.student_spec.family,
                "spec_json": session.student_spec.to_json(),
            },
            "hyperparameters": asdict(session.hyper),
        },
        "student": {
            "name": local.name,
            "version": local.version,
            "accuracy": accuracy,
            "split_accuracy": last_eval[-1].accuracy if last_eval else None,
            "parameters": info.parameters,
            "onnx_sha256": info.sha256,
            "onnx_bytes": info.size_bytes,
            "max_abs_diff": info.max_abs_diff,
            "path": str(local.path),
        },
        "teacher": {
            "parameters": zoo.parameter_count(session.teacher_spec),
            "head_parameters": sum(v.size for v in session.teacher_head.values()),
        },
        "traffic": {
            **traffic_totals,
            "step_bytes_up_mean": sum(r.bytes_up for r in result.history) / steps,
            "step_bytes_down_mean": sum(r.bytes_down for r in result.history) / steps,
        },
        "timing": {
            "forward_seconds": sum(r.forward_seconds for r in result.history),
            "network_seconds": sum(r.network_seconds for r in result.history),
            "backward_seconds": sum(r.backward_seconds for r in result.history),
            "step_seconds_mean": sum(
                r.forward_seconds + r.network_seconds + r.backward_seconds for r in result.history
            )
            / steps,
        },
        "steps": result.steps,
        "wall_seconds": time.perf_counter() - started,
        "energy": telemetry.report(),
        "history": [
            {**record, "energy_joules": joules}
            for record, joules in zip(
                result.history_dicts(), telemetry.cumulative_joules, strict=True
            )
        ],
        "evaluations": [asdict(e) for e in result.evaluations],
    }
    write_report(options.report, report)
    if options.plots:
        _plot(options.report, report)
    return report


def _plot(report_path: Path, report: dict[str, Any]) -> None:
    """PNG plots beside the report; skipped when matplotlib (the [plots] extra) is absent."""
    try:
        from splitkd import plots
    except ImportError:
        log.info("no plots: install the [plots] extra (matplotlib) for PNGs beside the report")
        return
    reports = {report["device_id"]: report}
    for path in plots.write_plots(report_path.parent, reports, prefix=f"{report_path.stem}-"):
        log.info("plot: %s", path)


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)


def _progress(total: int, options: TrainOptions) -> Any:
    if not options.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{options.device_id} split-KD", unit="step", dynamic_ncols=True)
