"""``splitkd-edge train --cohort NAME``: a device's part in a fleet.

Join the cohort, then round after round: fetch the class's current student,
measure it on the device's held-out data, do the round's local work, submit
the weights (never data). Federated mode trains the whole small student
here; split mode trains through the round's split session (head here, tail
in the cloud). At the end, download the cohort's student (ONNX), verify it
and evaluate it with onnxruntime, like a solo run.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from edge_agent.client import CloudClient
from edge_agent.errors import CloudRefused, EdgeError
from edge_agent.fleet_weights import HeldStudent, StaleBase
from edge_agent.inference import Predictor
from edge_agent.model_store import LocalModel, ModelStore
from edge_agent.telemetry import TrainingTelemetry
from edge_agent.trainer import EdgeTrainer, GrpcTransport
from splitkd import koala
from splitkd import weights_codec as wc
from splitkd.data.partition import EdgeSplit
from splitkd.messages import NEXT_ROUND, JoinAnswer, RoundState, RoundTask, SessionInfo, Update
from splitkd.models import zoo
from splitkd.training import accuracy_of, predict

log = logging.getLogger(__name__)
MAX_RESUMES_PER_ROUND = 20


@dataclass
class RoundFigures:
    round: int
    accuracy: float  # the round's starting model on this device's held-out data
    bytes_up: int
    bytes_down: int
    seconds: float
    compute_seconds: float
    steps: int = 0


@dataclass
class CohortRun:
    join: JoinAnswer
    rounds: list[RoundFigures] = field(default_factory=list)
    devices: int = 0
    server_model_version: int = 0
    last: RoundTask | None = None
    mark: tuple[int, int, float] | None = None  # traffic and time when the next round began
    # Split mode: which training samples' teacher outputs the cloud holds for this member
    # (its cache outlives the round sessions), and the wire the round sessions use.
    cached: np.ndarray | None = None
    wire: dict[str, Any] = field(default_factory=dict)
    held: HeldStudent | None = None  # federated mode: the student held here (fedwire)


def run_rounds(
    client: CloudClient,
    join: JoinAnswer,
    split: EdgeSplit,
    telemetry: TrainingTelemetry,
    device_id: str = "",
) -> CohortRun:
    """Take part in rounds until the cohort completes; returns what the device saw.

    ``device_id`` seeds the rounding of its weight uploads (a run then repeats).
    """
    run = CohortRun(join)
    if join.config.mode == "federated":
        seed = join.hyper.seed * (1 << 32) + zlib.crc32(device_id.encode())
        run.held = HeldStudent.for_member(join.weights_codec, seed)
    expected = {k: tuple(v.shape) for k, v in zoo.build(join.student_spec).state_dict().items()}
    after, idle_since = 0, time.monotonic()
    # A cohort whose rounds stop coming for this long is gone (its cloud lost it).
    patience = max(600.0, 3 * join.config.round_timeout_seconds)
    while True:
        # A round's bytes include the polls that waited for it and the weights fetched.
        if run.mark is None:
            run.mark = (client.traffic.bytes_up, client.traffic.bytes_down, time.monotonic())
        held = run.held.held_digest() if run.held is not None else 0
        task = client.fetch_round(join.member_id, after, expected, held)
        run.devices, run.server_model_version, run.last = (
            task.devices,
            task.server_model_version,
            task,
        )
        if task.state is RoundState.COMPLETE:
            return run
        if task.state is RoundState.WAITING:
            if time.monotonic() - idle_since > patience:
                raise EdgeError(f"cohort {join.cohort}: no round for {patience:.0f} s; giving up")
            started = time.monotonic()
            time.sleep(max(0.05, task.retry_after_seconds))  # the cloud says when to ask again
            telemetry.meter.wait(time.monotonic() - started)
            continue
        if run.held is not None:
            try:
                task = replace(task, weights=run.held.take(task))
            except StaleBase as exc:
                log.warning("round %d: %s; fetching the whole student", task.round, exc)
                run.held.forget()
                continue
        try:
            figures = _one_round(client, join, task, split, telemetry, run)
        except CloudRefused as exc:
            if exc.code == "FAILED_PRECONDITION" and NEXT_ROUND in exc.details:
                # A straggler: the round closed at its deadline without this update.
                log.warning("round %d closed without this device's update; next round", task.round)
                after = task.round
                continue
            if exc.code != "NOT_FOUND" or join.config.mode != "split":
                raise
            # The cloud restarted and lost the round's split session: fetch the round again.
            log.warning("round %d: %s; fetching the round again", task.round, exc)
            continue
        run.rounds.append(figures)
        run.mark = None
        after, idle_since = task.round, time.monotonic()


def _one_round(
    client: CloudClient,
    join: JoinAnswer,
    task: RoundTask,
    split: EdgeSplit,
    telemetry: TrainingTelemetry,
    run: CohortRun,
) -> RoundFigures:
    assert run.mark is not None
    up, down, started = run.mark
    compute_started = time.perf_counter()
    if join.config.mode == "federated":
        model = koala.model_from(join.student_spec, task.weights)
        accuracy = accuracy_of(predict(model, split.heldout.x), split.heldout.y)
        weights, _loss = koala.local_train(
            join.student_spec,
            task.weights,
            split.train,
            join.hyper,
            join.config.local_epochs,
            seed=join.hyper.seed * 100_003 + task.round,
        )
        compute = time.perf_counter() - compute_started
        steps = 0
    else:
        assert isinstance(task.session, SessionInfo), "split round without a session"
        weights, accuracy, steps, compute = _split_round(client, task.session, split, run)
    telemetry.meter.compute(compute)
    update = Update(join.member_id, task.round, weights, len(split.train), accuracy, steps)
    answer = _submit(client, update, run.held)
    log.info(
        "%s round %d: start model %.4f on held-out data, update %s",
        join.cohort,
        task.round,
        accuracy,
        "taken again (duplicate)" if answer.duplicate else "taken",
    )
    return RoundFigures(
        round=task.round,
        accuracy=accuracy,
        bytes_up=client.traffic.bytes_up - up,
        bytes_down=client.traffic.bytes_down - down,
        seconds=time.monotonic() - started,
        compute_seconds=compute,
        steps=steps,
    )


def _submit(client: CloudClient, update: Update, held: HeldStudent | None) -> Any:
    """Submit ``update``; as a delta when the weights codec says so, whole when the
    cloud no longer holds the delta's base (it restarted, another replica took over)."""
    if held is None or not held.deltas:
        return client.submit_update(update)
    try:
        return client.submit_update(held.as_sent(update))
    except CloudRefused as exc:
        if wc.BASE_UNKNOWN not in exc.details:
            raise
        log.warning("round %d: %s; sending the whole student", update.round, exc.details)
        held.encoder.reset()  # the whole student carries everything owed
        return client.submit_update(update)


def _split_round(
    client: CloudClient, session: SessionInfo, split: EdgeSplit, run: CohortRun
) -> tuple[dict[str, np.ndarray], float, int, float]:
    """Train the round's split session; returns head, start accuracy, steps, device seconds.

    The held-out set is measured once, on the round's starting model (the cohort's
    figure for the round): a measure within the round would be of a head and a private
    copy of the tail that no device ever gets, so none is made (``eval_every`` 0).
    """
    transport = GrpcTransport(client, session)
    trainer = EdgeTrainer(session, split.train, split.heldout, transport)
    trainer.eval_every = 0
    if trainer.cached is not None and run.cached is not None:
        # The cloud keeps this member's teacher outputs across rounds (a miss, e.g. after
        # a restart or a new teacher version, makes the trainer send a batch again).
        trainer.cached = run.cached
    run.wire = {
        "codec": session.hyper.wire_codec,
        "student_cut": session.student_cut,
        "teacher_cache": trainer.cached is not None,
    }
    accuracy = trainer.evaluate_split()
    for _ in range(MAX_RESUMES_PER_ROUND):
        try:
            result = trainer.run()
            break
        except CloudRefused as exc:
            if exc.method not in ("Step", "Evaluate") or exc.code != "FAILED_PRECONDITION":
                raise
            step, _ = client.resume(session.session_id, trainer.restorable_steps())
            log.warning("%s; resuming the round's session at step %d", exc, step)
            trainer.restore(step)
    else:
        raise EdgeError(f"gave up the round after {MAX_RESUMES_PER_ROUND} resumes")
    compute = sum(r.forward_seconds + r.backward_seconds for r in result.history)
    run.cached = trainer.cached
    return trainer.head_state(), accuracy, result.steps, compute


def install_final(
    client: CloudClient, run: CohortRun, models: ModelStore, input_shape: tuple[int, ...]
) -> tuple[LocalModel, Predictor]:
    """Download the cohort's latest student for this class, verify and install it."""
    summary = run.last.model if run.last is not None else None
    if summary is None:
        raise EdgeError(f"cohort {run.join.cohort} completed without a published student")
    download = models.root / f".{summary.name}-{summary.version}.download"
    chunk = client.download(summary.name, summary.version, download, expected_sha256=summary.sha256)
    metadata = {
        "name": summary.name,
        "version": summary.version,
        "sha256": summary.sha256,
        "size_bytes": summary.size_bytes,
        "input_shape": list(input_shape),
        "num_classes": run.join.student_spec.num_classes,
        "cohort": run.join.cohort,
        "total_size": chunk.total_size,
    }
    local = models.install(summary.name, summary.version, download, metadata)
    return local, Predictor(local.path, input_shape)


def cohort_report(run: CohortRun) -> dict[str, Any]:
    return {
        "name": run.join.cohort,
        "mode": run.join.config.mode,
        "device_class": run.join.device_class,
        "devices": run.devices,
        "server_model_version": run.server_model_version,
        "config": asdict(run.join.config),
        "wire": run.wire or None,  # split mode: codec, student cut, teacher cache
        # federated mode: how the weights travelled (fedwire)
        "weights_codec": run.held.codec if run.held is not None else None,
        "rounds": [asdict(r) for r in run.rounds],
    }
