"""``splitkd-edge train``: register, split-train, finish, download, verify, evaluate, report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_agent.checkpoints import EdgeCheckpoints
from edge_agent.client import CloudClient
from edge_agent.data import LocalData
from edge_agent.errors import CloudRefused, EdgeError
from edge_agent.inference import Predictor
from edge_agent.metrics import EdgeMetrics
from edge_agent.model_store import ModelStore
from edge_agent.pipeline import check_depth
from edge_agent.security import EdgeSecurity
from edge_agent.teacher_check import check_teacher, compare_with_student
from edge_agent.teacher_check import report as teacher_report
from edge_agent.telemetry import TrainingTelemetry
from edge_agent.trainer import EdgeTrainer, EvalRecord, GrpcTransport, StepRecord
from splitkd import checkpoint
from splitkd.atomic import write_json_atomic
from splitkd.classes import class_scores
from splitkd.data.partition import Shard
from splitkd.data.specs import Dataset
from splitkd.messages import SessionAsk, SessionInfo
from splitkd.models import zoo
from splitkd.signature import DatasetSignature

log = logging.getLogger(__name__)
# Each resume follows a real fault; more than this in one run means a loop.
MAX_RESUMES = 100


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
    # None: splitkd.data.partition.default_presumed_fraction (none of a user's file).
    presumed_fraction: float | None = None
    class_weighting: str = "none"  # or "balanced" (splitkd/classes.py)
    device_profile: str = ""
    link_profile: str = ""
    progress: bool = True
    timeout: float = 60.0
    metrics: EdgeMetrics | None = None
    plots: bool = True
    checkpoint_dir: Path = Path(".splitkd-edge")
    fresh: bool = False
    retry_seconds: float = 300.0
    # TLS and the device credential (edge_agent/security.py); None: plaintext, no credential.
    security: EdgeSecurity | None = None
    # "cloud": the session's KD weight; "auto": scaled by the teacher's accuracy
    # on this device's held-out data (edge_agent/teacher_check.py).
    kd_alpha: str = "cloud"
    cohort: str = ""  # join this cohort (a fleet) instead of training alone
    weights_codec: str = "cloud"  # federated cohorts: how weights travel (splitkd/weights_codec.py)
    # The frugal wire (splitkd/codecs.py, cloud_service/teacher_cache.py) and the cuts.
    wire_codec: str = "cloud"  # "cloud": the cloud's default
    no_teacher_cache: bool = False
    student_cut: int = 0  # 0: the cloud's
    eval_every: int = 1  # epochs between held-out evaluations through the split
    teacher_cut: int = 0
    plan: str = ""  # "auto": edge_agent/plan.py chooses the cut and the codec
    objective: str = "time"
    pipeline_depth: int = 1  # steps in flight (edge_agent/pipeline.py)


def cloud_client(options: TrainOptions, telemetry: TrainingTelemetry) -> CloudClient:
    """The run's gRPC client: TLS and credential from ``options``, traffic into ``telemetry``."""
    security = options.security or EdgeSecurity()
    client = CloudClient(
        options.cloud,
        timeout=options.timeout,
        retry_seconds=options.retry_seconds,
        credentials=security.channel_credentials(),
        metadata=security.call_metadata(options.device_id),
        # A cohort's members share its state, so they share a replica too.
        routing_key=options.cohort or options.device_id,
        # A solo session needs no hash: placed by balance, then kept where it is.
        sticky=not options.cohort,
    )
    client.on_traffic = telemetry.on_traffic
    return client


def train(
    options: TrainOptions,
    on_step: Callable[[StepRecord], None] | None = None,
) -> dict[str, Any]:
    if options.cohort:
        from edge_agent.cohort_run import train_cohort

        return train_cohort(options)
    started = time.perf_counter()
    check_depth(options.pipeline_depth)  # before any work: a typo should not cost a session
    telemetry = TrainingTelemetry(options.device_profile, options.link_profile, options.metrics)
    if options.metrics is not None:
        options.metrics.describe_device(
            options.device_id, telemetry.device.name, telemetry.link.name
        )
    local = LocalData.load(options)
    dataset, split = local.dataset, local.split
    plan = None
    if options.plan == "auto":
        from edge_agent import plan as planner

        plan = planner.plan_for(options, local)
        options = planner.apply(plan, options)
    with cloud_client(options, telemetry) as client:
        store = EdgeCheckpoints(options.checkpoint_dir, avoid=options.model_dir)
        identity = {
            "cloud": options.cloud,
            "data": options.data,
            "shard": str(options.shard) if options.shard else "0/1",
            "device_id": options.device_id,
            # Another split or weighting is another run: never resume it.
            "presumed_fraction": str(local.presumed_fraction),
            "class_weighting": options.class_weighting,
        }
        session, restored = _resume_saved(client, store, identity, options.fresh)
        telemetry.earlier = store.earlier if restored is not None else {}
        store.totals = lambda: telemetry.totals(
            **asdict(client.traffic), wall_seconds=time.perf_counter() - started
        )
        if session is None:
            session = client.register(
                options.device_id,
                local.signature,
                requested_epochs=options.epochs,
                device_profile=telemetry.device.name,
                link_profile=telemetry.link.name,
                class_weights=local.class_weights,
                ask=SessionAsk(
                    wire_codec="" if options.wire_codec == "cloud" else options.wire_codec,
                    train_samples=0 if options.no_teacher_cache else len(split.train),
                    student_cut=options.student_cut,
                    teacher_cut=options.teacher_cut,
                    pipeline_depth=options.pipeline_depth,
                ),
            )
            store.start({**identity, "session_id": session.session_id})
        local.check_task(session.student_spec.num_classes)
        transport = GrpcTransport(client, session)
        trainer = EdgeTrainer(session, split.train, split.heldout, transport, store)
        trainer.eval_every = options.eval_every
        trainer.pipeline_depth = options.pipeline_depth
        if restored is not None:
            trainer.load(restored)
        client.keep_alive(session.session_id)
        # Before training (and again on a restart: the teacher is frozen, same figure).
        teacher = check_teacher(
            trainer.evaluate_teacher(),
            split.heldout.y,
            session.hyper.kd_alpha,
            session.teacher_accuracy,
            options.kd_alpha,
        )
        trainer.kd_alpha = teacher.alpha if options.kd_alpha == "auto" else None
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

        resumes = 0
        try:
            while True:
                try:
                    result = trainer.run(on_step=step_done, on_eval=on_eval, traffic=traffic)
                    break
                except CloudRefused as exc:
                    # The cloud is behind us (it restarted from a checkpoint) or
                    # lost the step: agree on a step both can restore, go on.
                    if exc.method not in ("Step", "Evaluate") or exc.code != "FAILED_PRECONDITION":
                        raise
                    if resumes >= MAX_RESUMES:
                        raise EdgeError(f"gave up after {resumes} resumes: {exc}") from exc
                    step, _ = client.resume(session.session_id, trainer.restorable_steps())
                    log.warning("%s; resuming both sides at step %d", exc, step)
                    trainer.restore(step)
                    if bar is not None:
                        bar.n = step
                        bar.refresh()
                    resumes += 1
        finally:
            if bar is not None:
                bar.close()
        info = client.finish(session.session_id, trainer.head_state(), result.steps)
        models = ModelStore(options.model_dir)
        download = models.download_path(info.name, info.version)
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
        installed = models.install(info.name, info.version, download, metadata)
        store.clear()  # finished: nothing left to resume
        traffic_totals = asdict(client.traffic)
    telemetry.finish()
    scores = _student_scores(installed.path, dataset.signature, split.heldout)
    steps = max(1, len(result.history))
    report = {
        "device_id": options.device_id,
        "device_profile": telemetry.device.name,
        "link_profile": telemetry.link.name,
        "cloud": options.cloud,
        "data": local.report(session.student_spec.num_classes),
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
            "wire_codec": session.hyper.wire_codec,
            # Teacher outputs sent once per sample (the cloud's cache) or every epoch.
            "teacher_cache": trainer.cached is not None,
        },
        "student": {
            "name": installed.name,
            "version": installed.version,
            **scores.as_report(),
            "split_accuracy": last_eval[-1].accuracy if last_eval else None,
            "parameters": info.parameters,
            "onnx_sha256": info.sha256,
            "onnx_bytes": info.size_bytes,
            "max_abs_diff": info.max_abs_diff,
            "path": str(installed.path),
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
        "pipeline": {"depth": trainer.pipeline_depth, "most_in_flight": trainer.most_in_flight},
        "training_seconds": result.wall_seconds,
        "wall_seconds": time.perf_counter() - started,
        "energy": telemetry.report(),
        "faults": {
            "resumed_at_start": restored.step if restored is not None else None,
            "resumes": resumes,
            "repeated_steps": trainer.repeated_steps,
            "retried_calls": client.retried_calls,
        },
        "history": [
            {**record, "energy_joules": telemetry.cumulative_joules.get(record["step"], 0.0)}
            for record in result.history_dicts()
        ],
        "evaluations": [asdict(e) for e in result.evaluations],
    }
    compare_with_student(teacher, scores.accuracy)
    report["teacher_check"] = teacher_report(teacher, scores.accuracy)
    report = telemetry.add_earlier(report)  # a run resumed after a restart counts every process
    if plan is not None:
        report["plan"] = planner.compare(plan, report, result.wall_seconds)
    write_report(options.report, report)
    if options.plots:
        _plot(options.report, report)
    return report


def _student_scores(path: Path, signature: DatasetSignature, heldout: Dataset) -> Any:
    """The downloaded ONNX student on the held-out split: class scores, or a language
    model's per-token accuracy and perplexity (through its incremental decoder)."""
    if signature.tokens:
        from edge_agent.generate import LanguageScores

        return LanguageScores.of(path, heldout)
    predictor = Predictor(path, signature.input_shape)
    return class_scores(predictor.classes(heldout.x), heldout.y)


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


def _resume_saved(
    client: CloudClient, store: EdgeCheckpoints, identity: dict[str, str], fresh: bool
) -> tuple[SessionInfo | None, checkpoint.TrainingState | None]:
    """The session this device was training when it stopped, rolled back to a common step."""
    saved = store.session()
    if fresh and saved is not None:
        # Discarded now, not only once the new Register succeeds: a run that then
        # fails must not resume the abandoned session next time. The cloud lets
        # the abandoned one go when this device reaches its session cap.
        log.warning(
            "--fresh: abandoning session %s…; its checkpoints in %s are discarded",
            str(saved.get("session_id", ""))[:8],
            store.folder,
        )
        store.clear()
    if fresh or saved is None:
        return None, None
    if any(saved.get(key) != value for key, value in identity.items()):
        log.info(
            "checkpoint in %s is for another run (%s); starting a new session", store.folder, saved
        )
        return None, None
    states = store.states()
    try:
        step, session = client.resume(saved["session_id"], sorted(states))
    except CloudRefused as exc:
        if exc.code not in ("NOT_FOUND", "FAILED_PRECONDITION"):
            raise
        log.warning("cannot resume the saved session (%s); starting a new one", exc.details)
        return None, None
    log.warning(
        "resumed session %s… at step %d from %s", saved["session_id"][:8], step, store.folder
    )
    return session, states[step]


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)


def _progress(total: int, options: TrainOptions) -> Any:
    if not options.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{options.device_id} split-KD", unit="step", dynamic_ncols=True)
