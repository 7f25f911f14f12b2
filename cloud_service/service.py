"""The cloud's application logic: register, step, evaluate, finish, download.

Takes and returns domain values (numpy arrays, dataclasses); the gRPC
servicer and the HTTP API are thin adapters over this class.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cloud_service import pipeline
from cloud_service.checkpoints import SessionCheckpoints
from cloud_service.leases import Leases
from cloud_service.limits import RateLimiter, check_free_text, check_label, shown
from cloud_service.metrics import CloudMetrics
from cloud_service.registry import ModelRecord, ModelRegistry
from cloud_service.session import Session
from cloud_service.sessions import SessionStore
from cloud_service.teacher import Teacher, TeacherVersions
from cloud_service.teacher_cache import TeacherCache, for_spec
from splitkd import codecs, names
from splitkd.classes import check_class_weights, padded_class_weights
from splitkd.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    SplitKDError,
    Unavailable,
)
from splitkd.hyper import Hyperparameters
from splitkd.messages import SessionAsk, StepOutcome, TaskDescription
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel
from splitkd.onnx_export import export_checked
from splitkd.signature import DatasetSignature

log = logging.getLogger(__name__)

# 1 MiB chunks: well under gRPC's 4 MiB default receive limit on any client.
DOWNLOAD_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class CohortStudent:
    """One device class's student of a finished cohort, and how to publish its successor."""

    model_name: str
    spec: ModelSpec
    weights: dict[str, np.ndarray]
    publish: Callable[[StagedModel, int], ModelRecord]  # (model, teacher version) -> record


@dataclass(frozen=True)
class CloudConfig:
    student_cut: int = 1
    teacher_cut: int = 1
    hyper: Hyperparameters = field(default_factory=Hyperparameters)
    student_spec: ModelSpec | None = None
    # Teacher-output caches (teacher_cache.py): all sessions' together stay within
    # this many bytes, and one session caches at most this many samples.
    teacher_cache_bytes: int = 256 << 20
    teacher_cache_samples: int = 1_000_000


class CloudService:
    def __init__(
        self,
        teacher: Teacher | TeacherVersions,
        registry: ModelRegistry,
        sessions: SessionStore,
        config: CloudConfig,
        metrics: CloudMetrics | None = None,
        checkpoints: SessionCheckpoints | None = None,
        limiter: RateLimiter | None = None,
        restore_at_start: bool = True,
    ) -> None:
        """``restore_at_start``: load every stored session now (one cloud); replicas
        restore a session when its first call lands (cloud_service/replicas.py)."""
        # The server model has versions (federated cohorts teach it); a session
        # keeps the version it registered with, see TeacherVersions.
        self.teachers = (
            teacher if isinstance(teacher, TeacherVersions) else TeacherVersions(teacher)
        )
        teacher = self.teachers.current()
        self.metrics = metrics or CloudMetrics()
        self.metrics.track_sessions(lambda: self.sessions.active())
        self.metrics.track_teacher_cache(lambda: self.cache_bytes())
        self.registry = registry
        self.sessions = sessions
        self.config = config
        self.student_spec = config.student_spec or zoo.default_student(teacher.signature)
        self.student_spec.check_cut(config.student_cut, "student cut")
        teacher.spec.check_cut(config.teacher_cut, "teacher cut")
        # Export is CPU-heavy and rare: one at a time keeps steps of other sessions flowing.
        self.export_lock = threading.Lock()
        # Set by a FleetService: may this device read that cohort's students?
        self.cohort_member: Callable[[str, str], bool] | None = None
        # Set by a FleetService: teacher caches its members keep between rounds (fleet/wire.py).
        self.held_caches: Callable[[], list[TeacherCache]] | None = None
        # Set by a FleetService: a finished cohort's students, to re-distil (lifecycle.py).
        self.cohort_students: Callable[[str], list[CohortStudent]] | None = None
        self.checkpoints = checkpoints
        # Set by cloud_service.replicas.Replica: sessions are owned through leases.
        self.leases: Leases | None = None
        # Sessions activated whose first save has not succeeded yet (see _first_save).
        self._unsaved: set[str] = set()
        self.limiter = limiter or RateLimiter()
        if checkpoints is not None:
            sessions.on_expire = lambda session: checkpoints.remove(session.session_id)
            if restore_at_start:
                self._restore(checkpoints)

    def _restore(self, checkpoints: SessionCheckpoints) -> None:
        for restored in checkpoints.load_all(self.teachers):
            try:
                self.sessions.restore(restored)
            except ResourceExhausted as exc:
                log.warning("session %s… not restored: %s", restored.session_id[:8], exc)
                continue
            log.info(
                "session %s… of %s restored at step %d",
                restored.session_id[:8],
                restored.device_id,
                restored.next_step,
            )

    def ready(self) -> bool:
        """Whether this cloud can serve: its shared storage answers (always, without one)."""
        store = getattr(self.checkpoints, "store", None)
        return bool(getattr(store, "ready", True))

    @property
    def teacher(self) -> Teacher:
        """The current version of the server model (sessions keep their own)."""
        return self.teachers.current()

    @staticmethod
    def check_device(device_id: str) -> None:
        if not names.is_device_id(device_id):
            raise InvalidArgument(
                f"device id {shown(device_id)} must be 1-64 letters, digits, '.', '_' or '-'"
            )

    def register(
        self,
        device_id: str,
        signature: DatasetSignature,
        *,
        requested_epochs: int = 0,
        device_profile: str = "",
        link_profile: str = "",
        student_spec: ModelSpec | None = None,
        initial_state: dict[str, np.ndarray] | None = None,
        model_name: str | None = None,
        persist: bool = True,
        class_weights: Sequence[float] = (),
        ask: SessionAsk | None = None,
        cache: TeacherCache | None = None,
    ) -> Session:
        """A new split session; a cohort passes its class's spec and current weights,
        and the member's teacher-output ``cache`` kept across its rounds (fleet/wire.py)."""
        ask = ask or SessionAsk()
        self.check_device(device_id)
        check_label(device_profile, "device profile")
        check_label(link_profile, "link profile")
        check_free_text(signature.name, "the data set's name")
        if requested_epochs < 0:
            raise InvalidArgument(f"requested epochs must be >= 0, got {requested_epochs}")
        teacher = self.teachers.current()
        teacher.check_serves(signature)
        weights = padded_class_weights(
            check_class_weights(class_weights, signature.num_classes),
            self.student_spec.num_classes,
        )
        hyper = self.config.hyper.with_epochs(requested_epochs)
        if ask.wire_codec:
            hyper = replace(hyper, wire_codec=codecs.check_name(ask.wire_codec))
        spec = student_spec or self.student_spec
        student_cut, teacher_cut = self.cuts(spec, teacher.spec, ask)
        student = zoo.build(spec, hyper.seed)
        if initial_state is not None:
            student.load_state_dict(
                {k: torch.from_numpy(v.copy()) for k, v in initial_state.items()}
            )
        session = Session(
            session_id=SessionStore.new_id(),
            device_id=device_id,
            student_spec=spec,
            teacher_spec=teacher.spec,
            student_cut=student_cut,
            teacher_cut=teacher_cut,
            hyper=hyper,
            model_name=model_name or f"student-{device_id}",
            student=student,
            teacher=teacher.model,
            teacher_version=teacher.version,
            persisted=persist,
            device_profile=device_profile,
            link_profile=link_profile,
            class_weights=weights,
            cache=cache if cache is not None else self.grant_cache(ask.train_samples, spec),
            pipeline_depth=pipeline.check_depth(ask.pipeline_depth),
        )
        # Pending until its first step: holds no capacity, nothing on disk (sessions.py).
        self.sessions.add(session)
        log.info(
            "session %s… registered for device %s (%s)",
            session.session_id[:8],
            device_id,
            signature.describe(),
        )
        return session

    def cuts(self, student: ModelSpec, teacher: ModelSpec, ask: SessionAsk) -> tuple[int, int]:
        """The cuts a session trains at: the edge's ask when allowed, else the defaults.

        A cut is allowed from 1 (never raw inputs on the wire) to the last stage
        boundary before the model's final stage (the cloud always has a tail).
        """
        for cut, spec, what in (
            (ask.student_cut, student, "student"),
            (ask.teacher_cut, teacher, "teacher"),
        ):
            if cut and cut not in allowed_cuts(spec):
                raise InvalidArgument(
                    f"a {what} cut of {cut} is not allowed: choose one of {allowed_cuts(spec)} "
                    "(cut 0 would send raw inputs)"
                )
        return (
            ask.student_cut or self.config.student_cut,
            ask.teacher_cut or self.config.teacher_cut,
        )

    def describe(self, signature: DatasetSignature) -> TaskDescription:
        """What a session for ``signature`` would train, without opening one (the planner)."""
        teacher = self.teachers.current()
        teacher.check_serves(signature)
        return TaskDescription(
            student_spec=self.student_spec,
            teacher_spec=teacher.spec,
            student_cuts=tuple(allowed_cuts(self.student_spec)),
            teacher_cuts=tuple(allowed_cuts(teacher.spec)),
            default_student_cut=self.config.student_cut,
            default_teacher_cut=self.config.teacher_cut,
            hyper=self.config.hyper,
            wire_codecs=codecs.CODECS,
            teacher_cache_samples=self.config.teacher_cache_samples,
        )

    def grant_cache(self, train_samples: int, spec: ModelSpec) -> TeacherCache | None:
        """A teacher-output cache when the sample count fits the per-session and total budgets."""
        if train_samples < 0:
            raise InvalidArgument(f"train_samples must be >= 0, got {train_samples}")
        if not 0 < train_samples <= self.config.teacher_cache_samples:
            return None
        wanted = for_spec(train_samples, spec).reserved_bytes
        held = sum(c.reserved_bytes for c in self._caches())
        if held + wanted > self.config.teacher_cache_bytes:
            log.warning("teacher cache budget spent (%d bytes held): no cache granted", held)
            return None
        return for_spec(train_samples, spec)

    def cache_bytes(self) -> tuple[int, int]:
        """(allocated, reserved) bytes of every session's teacher cache."""
        caches = self._caches()
        return sum(c.nbytes for c in caches), sum(c.reserved_bytes for c in caches)

    def _caches(self) -> list[TeacherCache]:
        """Every teacher cache held: the sessions' (pending ones too: their pool is bounded,
        evicted ones free theirs) and the cohort members' between rounds, each once."""
        caches = {id(s.cache): s.cache for s in self.sessions.with_pending() if s.cache is not None}
        for cache in self.held_caches() if self.held_caches is not None else []:
            caches[id(cache)] = cache
        return list(caches.values())

    def admit(self, session_id: str, what: str = "steps") -> Session:
        """The session, once the caller's rate limit allows one more call: the
        servicer asks this before it decodes a single tensor."""
        session = self.sessions.get(session_id)
        self.limiter.acquire(session.device_id, what)
        return session

    def step(
        self,
        session_id: str,
        step: int,
        student_act: np.ndarray,
        teacher_act: np.ndarray | None,
        labels: np.ndarray | None,
        next_teacher_act: np.ndarray | None = None,
        kd_alpha: float | None = None,
        sample_ids: np.ndarray | None = None,
    ) -> StepOutcome:
        session = self.admit(session_id)
        return self.apply_step(
            session, step, student_act, teacher_act, labels, next_teacher_act, kd_alpha, sample_ids
        )

    def apply_step(
        self,
        session: Session,
        step: int,
        student_act: np.ndarray,
        teacher_act: np.ndarray | None,
        labels: np.ndarray | None,
        next_teacher_act: np.ndarray | None = None,
        kd_alpha: float | None = None,
        sample_ids: np.ndarray | None = None,
    ) -> StepOutcome:
        """A step of an admitted session (see :meth:`admit`)."""
        if kd_alpha is not None and not 0.0 <= kd_alpha <= 1.0:
            raise InvalidArgument(f"kd_alpha must be in [0, 1], got {kd_alpha}")
        with session.lock:
            pipeline.wait_turn(session, step)
            activated = self.sessions.activate(session)
            if self.checkpoints is not None and session.persisted:
                if activated:
                    self._unsaved.add(session.session_id)
                if session.session_id in self._unsaved:
                    self._first_save(session)
            result = session.step(
                step, student_act, teacher_act, labels, next_teacher_act, kd_alpha, sample_ids
            )
            if session.due_for_checkpoint():
                self._checkpoint(session)
            pipeline.turn_taken(session)
        if not result.replayed:
            self.metrics.observe_step(session.times.teacher_seconds, session.times.student_seconds)
        return result

    def _first_save(self, session: Session) -> None:
        """It trains now: from here a restart must be able to resume it. Until this
        succeeds (shared storage may be down) no step is applied: the edge retries."""
        assert self.checkpoints is not None
        if self.leases is not None and not self.leases.holds(session.session_id):
            raise Unavailable("this replica cannot take the session's lease; try again")
        self.checkpoints.save_meta(session)
        self.checkpoints.save_state(session.session_id, session.snapshots[0])
        self._unsaved.discard(session.session_id)

    def _checkpoint(self, session: Session) -> None:
        """Snapshot the live state (callers hold the session's lock)."""
        state = session.take_snapshot()
        session.keep_snapshot(state)
        if self.checkpoints is not None and session.persisted:
            self.checkpoints.save_state(session.session_id, state)

    def start_ahead(self, session_id: str) -> None:
        """Begin the teacher tail of activations a step sent ahead (after its answer left)."""
        try:
            session = self.sessions.get(session_id)
        except SplitKDError:
            return  # expired meanwhile: nothing to prepare
        with session.lock:
            session.start_ahead()

    def checkpoint_all(self) -> int:
        """On shutdown: every unfinished session's live state to disk. Returns how many are there.

        A session whose live step is already a checkpoint (the signal came right on a
        checkpoint step) is counted without being written again.
        """
        count = 0
        for session in self.sessions.all():
            with session.lock:
                if session.finished_version is not None or not session.persisted:
                    continue
                if self.leases is not None and not self.leases.held(session.session_id):
                    continue  # another replica serves it now: its files are not ours to write
                if session.next_step not in session.snapshots:
                    self._checkpoint(session)
                count += 1
        return count

    def resume(self, session_id: str, available_steps: list[int]) -> tuple[int, Session]:
        """Roll the session back to the latest step both sides can restore."""
        session = self.sessions.get(session_id)
        with session.lock:
            if session.finished_version is not None:
                raise FailedPrecondition("this session is finished; its student is published")
            common = set(available_steps) & set(session.restorable_steps())
            if not common:
                raise FailedPrecondition(
                    f"no step in common: the edge can restore {sorted(available_steps)[-5:]}, the cloud "
                    f"{session.restorable_steps()}; register again to start over"
                )
            step = max(common)
            repeated = session.next_step - step
            session.restore(step)
        log.info(
            "session %s… of %s resumed at step %d (%d steps rolled back)",
            session_id[:8],
            session.device_id,
            step,
            repeated,
        )
        return step, session

    def heartbeat(self, session_id: str) -> Session:
        return self.sessions.get(session_id)  # looking it up keeps it alive

    def evaluate(
        self, session_id: str, activations: np.ndarray, *, teacher: bool = False
    ) -> np.ndarray:
        """Logits of the student's tail, or with ``teacher`` of the teacher's tail."""
        return self.apply_evaluate(self.admit(session_id), activations, teacher=teacher)

    def apply_evaluate(
        self, session: Session, activations: np.ndarray, *, teacher: bool = False
    ) -> np.ndarray:
        with session.lock:
            if teacher:
                return session.evaluate_teacher(activations)
            return session.evaluate(activations)

    def finish(self, session_id: str, head_state: dict[str, np.ndarray], steps: int) -> ModelRecord:
        session = self.sessions.get(session_id)
        with session.lock:
            if session.finished_version is not None:
                return self.registry.get(session.model_name, session.finished_version)
            if steps != session.next_step:
                raise FailedPrecondition(
                    f"the edge applied {steps} steps but the cloud applied {session.next_step}; "
                    "resume training before finishing"
                )
            if session.next_step == 0:
                raise FailedPrecondition(
                    "no training step was applied in this session: an untrained student is not "
                    "published; train first"
                )
            student = session.assemble(head_state)
            record = self.publish_model(
                session.model_name,
                student,
                session.student_spec,
                device_id=session.device_id,
                steps=session.next_step,
                teacher_version=session.teacher_version,
            )
            session.finished_version = record.version
            if self.checkpoints is not None:
                # Published: nothing left to resume, so nothing kept on disk.
                self.checkpoints.remove(session.session_id)
                if self.leases is not None:
                    self.leases.forget(session.session_id)
            self.metrics.models_published.inc()
            log.info(
                "session %s… finished: %s v%d (%d bytes)",
                session_id[:8],
                record.name,
                record.version,
                record.size_bytes,
            )
            return record

    def publish_model(
        self, name: str, model: StagedModel, spec: ModelSpec, **meta: object
    ) -> ModelRecord:
        """Export ``model`` to ONNX, check it against PyTorch and publish it as a new version.

        Every published model (solo students, cohort students, the server model) comes
        through here; ``meta`` adds what the record should say of its origin.
        """
        with self.export_lock:
            onnx_bytes, diff = export_checked(model, spec.input_shape)
            return self.registry.publish(
                name,
                onnx_bytes,
                parameters=zoo.parameter_count(spec),
                max_abs_diff=diff,
                input_shape=list(spec.input_shape),
                num_classes=spec.num_classes,
                **meta,
            )

    def open_download(
        self, name: str, version: int, offset: int
    ) -> tuple[ModelRecord, Iterator[tuple[int, bytes]]]:
        """The model's record (checked now) and an iterator of ``(offset, chunk)`` from ``offset``."""
        record = self.registry.get(name, version)
        if not 0 <= offset <= record.size_bytes:
            raise InvalidArgument(
                f"offset {offset} is outside the model's {record.size_bytes} bytes"
            )
        path: Path = self.registry.path(name, record.version)
        return record, _chunks(path, offset)


def _chunks(path: Path, offset: int) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(DOWNLOAD_CHUNK_BYTES):
            yield offset, chunk
            offset += len(chunk)


def allowed_cuts(spec: ModelSpec) -> list[int]:
    """Stage boundaries a session may cut at: never 0 (raw inputs), never the end."""
    return list(range(1, spec.num_stages))
