"""The cloud's fleet logic: join a cohort, fetch a round's task, submit an update.

Takes and returns typed values (``splitkd.messages``); the gRPC adapter is
``cloud_service/fleet/servicer.py``. Rounds close on a single background
worker, so a device's submit answers at once even when the strategy runs
seconds of knowledge transfer. With replicas, which one runs a cohort's
rounds is decided by a lease (``cloud_service/fleet/shared.py``).
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_service.fleet.cohort import Cohort, Member, Pending
from cloud_service.fleet.config import CohortPlan
from cloud_service.fleet.pace import ClosePace
from cloud_service.fleet.shared import SharedCohorts
from cloud_service.fleet.store import CohortStore
from cloud_service.fleet.strategy import Contribution, RoundOutcome, Strategy, strategy_for
from cloud_service.fleet.weights import WeightMirrors, negotiate_weights, weights_ask
from cloud_service.fleet.wire import MemberCaches, current_join_ask, negotiate
from cloud_service.registry import ModelRecord
from cloud_service.service import CloudService, CohortStudent
from splitkd import koala, names
from splitkd import weights_codec as wc
from splitkd.device_classes import STANDARD, device_class, student_for
from splitkd.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SplitKDError,
)
from splitkd.messages import (
    CohortConfig,
    JoinAnswer,
    ModelSummary,
    RoundState,
    RoundTask,
    SessionAsk,
    Update,
)
from splitkd.models import zoo
from splitkd.models.normalize import fit_inputs
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel
from splitkd.signature import DatasetSignature

log = logging.getLogger(__name__)
MAX_MEMBERS_PER_COHORT = 10_000
# Round sessions live in memory only: after a restart or a take-over by another replica
# the edge is told NOT_FOUND, on which it fetches the round again (edge_agent/fleet.py).
_NO_ROUND_SESSION = (
    "no split session of this round here (the cloud restarted or another replica took "
    "the cohort over); fetch the round again"
)


@dataclass(frozen=True)
class FleetSettings:
    defaults: CohortConfig
    plans: dict[str, CohortPlan]
    proxy: np.ndarray | None = None  # the cloud's unlabelled proxy inputs (KOALA)
    labels: koala.CloudLabels | None = None  # the cloud's own labelled data, if any
    state_dir: Path | None = None
    # Replicas: cohort checkpoints in the shared store, each cohort owned through a lease.
    shared: SharedCohorts | None = None


class FleetService:
    def __init__(self, split: CloudService, settings: FleetSettings) -> None:
        self.split = split
        self.settings = settings
        self._lock = threading.Lock()
        self._cohorts: dict[str, Cohort] = {}
        self._plans: dict[str, CohortPlan] = {}
        self._strategies: dict[str, Strategy] = {}
        self._member_cohort: dict[str, str] = {}
        self._sessions: dict[str, tuple[int, str]] = {}  # member -> (round, split session id)
        self._session_lock = threading.Lock()
        self._closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round-close")
        self.shared = settings.shared
        self.store = CohortStore(settings.state_dir) if settings.state_dir else None
        if self.shared is not None:
            self.store = self.shared.store  # cohorts come and go with their leases
        split.cohort_member = self.is_member
        split.cohort_students = self.finished_students
        self.caches = MemberCaches(split)  # splitwire: teacher caches kept across rounds
        self.mirrors = WeightMirrors(split.config.hyper.seed)  # fedwire: what members hold
        self.pace = ClosePace()  # fedwire: waiting devices ask again when a close should be done
        if self.store is not None and self.shared is None:
            for cohort, state in self.store.load_all():
                self._resume(cohort, state)
                log.info("cohort %s restored at round %d", cohort.name, cohort.round)

    # -- cohorts ----------------------------------------------------------------
    def _resume(self, cohort: Cohort, state: dict[str, Any]) -> None:
        """Adopt a cohort from its checkpoint, with the strategy it was created with."""
        plan = self._plan_for(cohort.name)
        self._adopt(cohort, CohortPlan(cohort.config, state.get("strategy", ""), plan.classes))

    def _plan_for(self, name: str) -> CohortPlan:
        return self.settings.plans.get(name) or CohortPlan(self.settings.defaults)

    def _adopt(self, cohort: Cohort, plan: CohortPlan) -> None:
        self._cohorts[cohort.name] = cohort
        self._plans[cohort.name] = plan
        self._strategies[cohort.name] = strategy_for(
            plan.strategy_name,
            self.split.teachers,
            self.settings.proxy,
            self.settings.labels,
            cohort.name,
        )
        for member_id in cohort.members:
            self._member_cohort[member_id] = cohort.name

    def _cohort(self, name: str) -> Cohort:
        if self.shared is not None:
            held = self.shared.held(self, name)  # UNAVAILABLE while another replica has it
            if held is not None:
                return held
        with self._lock:
            if name not in self._cohorts:
                plan = self._plan_for(name)
                cohort = Cohort(name, plan.config, {}, {})
                cohort.server_model_version = self.split.teachers.current().version
                self._adopt(cohort, plan)
                log.info("cohort %s created (%s mode)", name, plan.config.mode)
            return self._cohorts[name]

    def _spec_for(self, name: str, device_class_name: str) -> ModelSpec:
        standard = self.split.student_spec
        custom = self._plans[name].classes.get(device_class_name)
        if custom is None:
            return student_for(device_class_name, standard)
        return ModelSpec(
            standard.family,
            standard.input_shape,
            standard.num_classes,
            custom.widths,
            custom.hidden,
        )

    def model_name(self, cohort: str, device_class_name: str) -> str:
        base = f"cohort-{cohort}"
        return base if device_class_name == STANDARD else f"{base}-{device_class_name}"

    # -- RPCs ---------------------------------------------------------------------
    def join(
        self,
        device_id: str,
        cohort_name: str,
        signature: DatasetSignature,
        num_samples: int,
        profile: str = "",
        ask: SessionAsk | None = None,
        weights_codec: str | None = None,
    ) -> JoinAnswer:
        """``ask``: the wire the device wants in split rounds, ``weights_codec`` how its
        weights travel in federated ones (default: its JoinCohort's)."""
        if not names.is_cohort_name(cohort_name):
            raise InvalidArgument(
                f"cohort name {cohort_name!r} must be 1-48 letters, digits, '.', '_' or '-'"
            )
        if not 1 <= num_samples <= 1 << 40:
            raise InvalidArgument(f"num_samples must be in 1..2^40, got {num_samples}")
        self.split.check_device(device_id)
        self.split.teacher.check_serves(signature)
        klass = device_class(profile)
        cohort = self._cohort(cohort_name)
        # splitwire: refused (a codec the cohort does not allow, a bad cut) before joining.
        spec = cohort.specs.get(klass) or self._spec_for(cohort_name, klass)
        ask = negotiate(cohort.config, spec, ask or current_join_ask())
        with cohort.lock:
            if len(cohort.members) >= MAX_MEMBERS_PER_COHORT:
                raise FailedPrecondition(f"cohort {cohort_name} is full")
            if klass not in cohort.specs:
                spec = self._spec_for(cohort_name, klass)
                cohort.specs[klass] = spec
                cohort.students[klass] = self._first_student(spec)
            # fedwire: refused (before joining) like the split wire's ask.
            weights = negotiate_weights(
                cohort.config,
                weights_ask.get() if weights_codec is None else weights_codec,
                cohort.students[klass],
            )
            member = cohort.join(device_id, klass, num_samples, ask)
            member.weights_codec = weights
            if self.shared is not None:
                # Before the answer (and again on a retried join: the first may have
                # failed here): a member's later calls may land on any replica.
                self.shared.store.remember_member(member.member_id, cohort_name)
            self._save(cohort)
            answer = JoinAnswer(
                member_id=member.member_id,
                cohort=cohort_name,
                device_class=klass,
                config=cohort.config,
                student_spec=cohort.specs[klass],
                hyper=self.split.config.hyper,
                model_name=self.model_name(cohort_name, klass),
                round=cohort.round,
                server_model_version=self.split.teachers.current().version,
                weights_codec=member.weights_codec,
            )
        with self._lock:
            self._member_cohort[member.member_id] = cohort_name
        log.info("device %s joined cohort %s as %s", device_id, cohort_name, klass)
        return answer

    def _member(self, member_id: str, device: str | None) -> tuple[Cohort, Member]:
        with self._lock:
            name = self._member_cohort.get(member_id)
            cohort = self._cohorts.get(name) if name else None
        if self.shared is not None:
            name = name or self.shared.store.cohort_of(member_id)
            cohort = self.shared.held(self, name) if name else None
        if cohort is None or member_id not in cohort.members:
            raise NotFound("unknown cohort member; join the cohort again")
        member = cohort.members[member_id]
        if device is not None and member.device_id != device:
            raise PermissionDenied("this member id belongs to another device")
        return cohort, member

    def check_member(self, member_id: str, device: str | None) -> None:
        self._member(member_id, device)

    def fetch(
        self, member_id: str, after_round: int, device: str | None = None, held: int = 0
    ) -> RoundTask:
        """``held``: the digest of the student the device holds (fedwire; 0: none)."""
        cohort, member = self._member(member_id, device)
        self.poke(cohort)
        with cohort.lock:
            state = cohort.task_state(member, after_round)
            number, left = cohort.round, cohort.seconds_left()
            weights = (
                cohort.students.get(member.device_class, {}) if state is RoundState.TRAINING else {}
            )
            summary = self._summary(cohort, member.device_class)
            devices = len(cohort.members)
            retry = self.pace.retry_after(cohort.name, cohort.aggregating)
        session = None
        if state is RoundState.TRAINING and cohort.config.mode == "split":
            session = self._round_session(cohort, member, number, weights)
            weights = {}  # the session carries the head; the tail stays in the cloud
        elif state is RoundState.TRAINING and member.weights_codec == wc.INT8_DELTA:
            down = self.mirrors.download(member, number, weights, held)
            return RoundTask(
                state=state,
                round=number,
                weights=down.weights,
                deadline_seconds=left,
                retry_after_seconds=retry,
                server_model_version=self.split.teachers.current().version,
                model=summary,
                devices=devices,
                weights_base=down.base,
                weights_digest=down.digest,
                packed=down.deltas,
            )
        return RoundTask(
            state=state,
            round=number,
            weights=weights,
            deadline_seconds=left,
            retry_after_seconds=retry,
            server_model_version=self.split.teachers.current().version,
            model=summary,
            session=session,
            devices=devices,
        )

    def _first_student(self, spec: ModelSpec) -> dict[str, np.ndarray]:
        """A class's first student. Its input statistics come from the cloud's proxy inputs
        when it has them: every device then scales its inputs alike (each device's own
        statistics, averaged by FedAvg, cost a non-IID fleet up to 5 points)."""
        model = zoo.build(spec, self.split.config.hyper.seed)
        proxy = self.settings.proxy
        if proxy is not None and tuple(proxy.shape[1:]) == tuple(spec.input_shape):
            fit_inputs(model, proxy)
        return koala.weights_of(model)

    def _summary(self, cohort: Cohort, klass: str) -> ModelSummary | None:
        version = cohort.published.get(klass)
        if version is None:
            return None
        record = self.split.registry.get(self.model_name(cohort.name, klass), version)
        return ModelSummary(record.name, record.version, record.sha256, record.size_bytes)

    def _round_session(self, cohort: Cohort, member: Member, number: int, weights: Any) -> Any:
        """Split mode: the member's split session for this round, from the class's student.

        Under ``_session_lock``: a fetch repeated at once (a retry) must not make two.
        """
        with self._session_lock:
            existing = self._sessions.get(member.member_id)
            if existing is not None and existing[0] == number:
                try:
                    return self.split.sessions.get(existing[1])
                except SplitKDError:
                    pass  # expired: make a new one
            session = self._new_round_session(cohort, member, weights)
            self._sessions[member.member_id] = (number, session.session_id)
            return session

    def _new_round_session(self, cohort: Cohort, member: Member, weights: Any) -> Any:
        # splitwire: on the member's negotiated wire, with its cache across rounds.
        name = self.model_name(cohort.name, member.device_class)
        return self.caches.register_round(cohort, member, weights, name)

    def expected_update(self, member_id: str) -> dict[str, tuple[int, ...]]:
        """Names and shapes a member's update must have (its whole student, or its head)."""
        cohort, member = self._member(member_id, None)
        if cohort.config.mode == "split":
            entry = self._sessions.get(member_id)
            if entry is None:
                raise NotFound(_NO_ROUND_SESSION)
            return self.split.sessions.get(entry[1]).head_shapes()
        # A class's student exists from its first member's join on.
        return {k: tuple(v.shape) for k, v in cohort.students[member.device_class].items()}

    def submit(self, update: Update, device: str | None = None) -> tuple[bool, int]:
        cohort, member = self._member(update.member_id, device)
        weights = update.weights
        if cohort.config.mode == "split":
            weights = self._split_update(member, update)
        elif update.weights_base:
            weights = self._delta_update(member, update)
        contribution = Contribution(
            member.member_id, member.device_class, weights, update.num_samples
        )
        with cohort.lock:
            fresh = cohort.accept(
                member, update.round, Pending(contribution, update.heldout_accuracy)
            )
            if fresh:
                self._save(cohort)
        self.poke(cohort)
        return fresh, update.round

    def _delta_update(self, member: Member, update: Update) -> dict[str, np.ndarray]:
        """fedwire: a federated update sent as int8 deltas, applied to its base."""
        if member.weights_codec != wc.INT8_DELTA:
            raise FailedPrecondition(
                f"this member's weights travel as {member.weights_codec}, not as deltas: "
                "send the whole student (or join again asking for int8-delta)"
            )
        return self.mirrors.reconstruct(member, update.weights_base, update.weights)

    def _split_update(self, member: Member, update: Update) -> dict[str, np.ndarray]:
        entry = self._sessions.get(member.member_id)
        if entry is None:
            raise NotFound(_NO_ROUND_SESSION)
        if entry[0] != update.round:
            raise FailedPrecondition(
                f"no split session of round {update.round} for this device; fetch the round"
            )
        session = self.split.sessions.get(entry[1])
        with session.lock:
            if update.steps != session.next_step or update.steps == 0:
                raise FailedPrecondition(
                    f"the device applied {update.steps} steps, the cloud {session.next_step}; "
                    "resume the round's session before submitting"
                )
            whole = koala.weights_of(session.assemble(update.weights))
        self.split.sessions.remove(session.session_id)
        return whole

    # -- closing rounds -----------------------------------------------------------
    def poke(self, cohort: Cohort) -> None:
        """Close the cohort's round on the background worker when it is due."""
        with cohort.lock:
            if not cohort.ready_to_close():
                return
            pending = cohort.begin_close()
            self.pace.began(cohort.name)
        self._closer.submit(self._close, cohort, pending)

    def poke_all(self) -> None:
        if self.shared is not None:
            self.shared.renew(self)  # leases of the cohorts held here; lost ones forgotten
        with self._lock:
            cohorts = list(self._cohorts.values())
        for cohort in cohorts:
            self.poke(cohort)

    def _close(self, cohort: Cohort, pending: list[Pending]) -> None:
        number = cohort.round
        outcome: RoundOutcome | None = None
        published: dict[str, int] = {}
        # In device order, not arrival order: float sums then come out the same every run.
        ordered = sorted(pending, key=lambda p: cohort.members[p.contribution.member_id].device_id)
        try:
            outcome = self._strategies[cohort.name].aggregate(
                number, dict(cohort.students), dict(cohort.specs), [p.contribution for p in ordered]
            )
            for klass in sorted({p.contribution.device_class for p in pending}):
                published[klass] = self._publish(cohort, klass, outcome.students[klass], number)
        except Exception:
            log.exception(
                "closing round %d of cohort %s failed; the round stays open", number, cohort.name
            )
            outcome = None
        with cohort.lock:
            if self.shared is not None and not self.shared.still_ours(self, cohort):
                return  # its new holder closes the round from the shared checkpoint
            record = cohort.end_close(outcome, published, pending)
            self.pace.ended(cohort.name)
            self._save(cohort)
            finished = list(cohort.members) if cohort.complete else []
        self.caches.drop(finished)  # splitwire: a complete cohort's teacher caches go
        self.mirrors.drop(finished)  # fedwire: and what its members held
        if record is not None:
            self.split.metrics.observe_round(
                cohort.name,
                record.round,
                len(cohort.members),
                record.accuracy,
                cohort.server_model_version,
            )
            log.info(
                "cohort %s round %d closed: %d devices, held-out accuracy %.4f, %.1f s",
                cohort.name,
                record.round,
                record.devices,
                record.accuracy,
                record.seconds,
            )

    def _publish(
        self, cohort: Cohort, klass: str, weights: dict[str, np.ndarray], number: int
    ) -> int:
        spec = cohort.specs[klass]
        model = koala.model_from(spec, weights)
        model.eval()
        record = self.split.publish_model(
            self.model_name(cohort.name, klass),
            model,
            spec,
            steps=number,
            cohort=cohort.name,
            teacher_version=self.split.teachers.current().version,
        )
        return record.version

    def _save(self, cohort: Cohort) -> None:
        if self.store is not None:
            self.store.save(cohort, self._plans[cohort.name])

    # -- operators ------------------------------------------------------------------
    def cohorts(self) -> list[dict[str, object]]:
        with self._lock:
            cohorts = list(self._cohorts.values())
        out = []
        for cohort in cohorts:
            with cohort.lock:
                out.append(cohort.summary())
        return out

    def describe(self, name: str) -> dict[str, object]:
        cohort = self._known(name)
        if cohort is None:
            raise NotFound(f"no cohort named {name!r}")
        with cohort.lock:
            return {**cohort.summary(), "members": cohort.member_list()}

    def finished_students(self, cohort_name: str) -> list[CohortStudent]:
        """A finished cohort's students by device class (a cohort still training has its
        rounds to publish: re-distilling it then would race them)."""
        with self._lock:
            cohort = self._cohorts.get(cohort_name)
        if self.shared is not None:  # publishing its successors: only its holder
            cohort = self.shared.held(self, cohort_name)
        if cohort is None:
            raise NotFound(f"no cohort named {cohort_name!r}")
        with cohort.lock:
            if not cohort.complete:
                raise FailedPrecondition(
                    f"cohort {cohort_name!r} is still training: re-distil it once it finished"
                )
            return [
                CohortStudent(
                    self.model_name(cohort.name, klass),
                    cohort.specs[klass],
                    {k: v.copy() for k, v in cohort.students[klass].items()},
                    functools.partial(self._publish_redistilled, cohort, klass),
                )
                for klass in sorted(cohort.students)
            ]

    def _publish_redistilled(
        self, cohort: Cohort, klass: str, model: StagedModel, teacher_version: int
    ) -> ModelRecord:
        record = self.split.publish_model(
            self.model_name(cohort.name, klass),
            model,
            cohort.specs[klass],
            cohort=cohort.name,
            teacher_version=teacher_version,
        )
        with cohort.lock:
            cohort.published[klass] = record.version
        return record

    def is_member(self, cohort_name: str, device_id: str) -> bool:
        cohort = self._known(cohort_name)
        if cohort is None:
            return False
        with cohort.lock:
            return any(m.device_id == device_id for m in cohort.members.values())

    def forget(self, name: str) -> Cohort | None:
        """Drop a cohort from memory (another replica holds it now)."""
        with self._lock:
            cohort = self._cohorts.pop(name, None)
            self._plans.pop(name, None)
            self._strategies.pop(name, None)
            members = [m for m, c in self._member_cohort.items() if c == name]
            for member_id in members:
                del self._member_cohort[member_id]
        self.caches.drop(members)  # its teacher caches go with it to the new holder
        self.mirrors.drop(members)  # fedwire: the new holder sends whole weights first
        return cohort

    def peek(self, name: str) -> Cohort | None:
        with self._lock:
            return self._cohorts.get(name)

    def held_names(self) -> list[str]:
        with self._lock:
            return list(self._cohorts)

    def adopt_restored(self, cohort: Cohort, state: dict[str, Any]) -> None:
        """A cohort taken over from another replica's checkpoint (fleet/shared.py)."""
        with self._lock:
            self._resume(cohort, state)
        with cohort.lock:
            self._republish_missing(cohort)

    def _republish_missing(self, cohort: Cohort) -> None:
        """Replicas share one registry (a folder store's or an S3 store's), so this finds
        nothing to do there; a replica with a registry of its own (a state folder) publishes
        the old holder's students again so members can fetch and download them here."""
        missing = []
        for klass, version in cohort.published.items():
            try:
                self.split.registry.get(self.model_name(cohort.name, klass), version)
            except NotFound:
                missing.append(klass)
        for klass in missing:
            number = cohort.history[-1].round if cohort.history else 0
            cohort.published[klass] = self._publish(cohort, klass, cohort.students[klass], number)
        if missing:
            self._save(cohort)

    def _known(self, name: str) -> Cohort | None:
        """The cohort if held here; with replicas, else as its shared checkpoint says (read
        only: an operator's or a download's look must not move a cohort)."""
        cohort = self.peek(name)
        if cohort is None and self.shared is not None and names.is_cohort_name(name):
            try:
                loaded = self.shared.store.load(name, weights=False)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("cohort %s: its checkpoint cannot be read (%s)", name, exc)
                return None
            cohort = None if loaded is None else loaded[0]
        return cohort

    def close(self) -> None:
        self._closer.shutdown(wait=True, cancel_futures=False)
        if self.shared is not None:
            self.shared.release_all()  # a clean stop: another replica takes them at once
