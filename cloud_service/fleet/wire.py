"""The frugal wire in split cohorts: a member's codec, cut and teacher-output cache.

A device asks at its join what a solo device asks at Register (``wire_codec``,
``student_cut``, ``train_samples``: ``splitkd-edge train --cohort NAME
--wire-codec … --student-cut …``). The cohort takes the ask, or refuses it before
the device becomes a member: a codec outside the cohort's ``wire_codecs``
FAILED_PRECONDITION, an unknown codec or a cut the cloud does not allow
INVALID_ARGUMENT. What a member does not ask comes from the cohort's settings
(``--cohort-config``), and what those leave open from the cloud's ``serve``
defaults (``--wire-codec``, ``--student-cut``), as for a solo session.

A member's round sessions are new sessions every round, but the teacher is
frozen while its version stays, so the member's teacher-output cache outlives
them: the teacher's outputs for a sample go up once per device per cohort. The
cache counts against the cloud's teacher-cache budget like a session's, is
replaced when the teacher version changes and dropped when the cohort
completes. A cloud that lost it (a restart) answers CACHE_MISS and the edge
sends the batch's teacher activations again, as in a solo session.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterable

import numpy as np

from cloud_service.fleet.cohort import Cohort, Member
from cloud_service.service import CloudService, allowed_cuts
from cloud_service.session import Session
from cloud_service.teacher_cache import TeacherCache
from splitkd import codecs
from splitkd.errors import FailedPrecondition, InvalidArgument
from splitkd.messages import CohortConfig, SessionAsk
from splitkd.models.spec import ModelSpec

# The ask of the JoinCohort call being served (set by fleet/wire_servicer.py).
join_ask: contextvars.ContextVar[SessionAsk | None] = contextvars.ContextVar(
    "splitkd_join_ask", default=None
)


def current_join_ask() -> SessionAsk:
    return join_ask.get() or SessionAsk()


def negotiate(config: CohortConfig, spec: ModelSpec, ask: SessionAsk) -> SessionAsk:
    """The member's ask as the cohort takes it, or a clear refusal (checked at join)."""
    if ask.wire_codec:
        codecs.check_name(ask.wire_codec)
        if config.wire_codecs and ask.wire_codec not in config.wire_codecs:
            default = config.wire_codec  # set whenever wire_codecs is (CohortConfig checks)
            raise FailedPrecondition(
                f"this cohort does not allow the wire codec {ask.wire_codec!r}: ask one of "
                f"{list(config.wire_codecs)}, or none for its default {default!r}"
            )
    cuts = allowed_cuts(spec)
    if ask.student_cut and ask.student_cut not in cuts:
        raise InvalidArgument(
            f"a student cut of {ask.student_cut} is not allowed: choose one of {cuts} "
            "(cut 0 would send raw inputs)"
        )
    if config.student_cut and config.student_cut not in cuts:
        raise FailedPrecondition(
            f"the cohort's student_cut {config.student_cut} is not allowed for this device "
            f"class's student (allowed {cuts}): fix the cohort's settings"
        )
    if not 0 <= ask.train_samples <= 1 << 40:
        raise InvalidArgument(f"train_samples must be in 0..2^40, got {ask.train_samples}")
    return SessionAsk(ask.wire_codec, ask.train_samples, ask.student_cut)


def round_ask(config: CohortConfig, member: Member) -> SessionAsk:
    """What the member's round session registers with: its ask, else the cohort's."""
    return SessionAsk(
        wire_codec=member.wire_codec or config.wire_codec,
        student_cut=member.student_cut or config.student_cut,
    )


class MemberCaches:
    """Teacher-output caches by cohort member, kept across the member's rounds."""

    def __init__(self, split: CloudService) -> None:
        self.split = split
        self._lock = threading.Lock()
        self._caches: dict[str, tuple[int, TeacherCache]] = {}  # member -> (teacher version, cache)
        split.held_caches = self.held

    def held(self) -> list[TeacherCache]:
        with self._lock:
            return [cache for _version, cache in self._caches.values()]

    def cache_for(self, member: Member, spec: ModelSpec, version: int) -> TeacherCache | None:
        """The member's cache for a round session against teacher ``version``.

        Called under the fleet's session lock: one at a time, so the budget check in
        ``grant_cache`` (which reads ``held`` and so takes this lock) sees every grant.
        """
        with self._lock:
            held = self._caches.pop(member.member_id, None)
            if held is not None and held[0] == version and held[1].capacity == member.train_samples:
                self._caches[member.member_id] = held
                return held[1]
        # None held, or outputs of another teacher version (or sample count): a new one,
        # granted after the stale one's bytes went back to the budget.
        cache = self.split.grant_cache(member.train_samples, spec)
        if cache is not None:
            with self._lock:
                self._caches[member.member_id] = (version, cache)
        return cache

    def drop(self, member_ids: Iterable[str]) -> None:
        with self._lock:
            for member_id in member_ids:
                self._caches.pop(member_id, None)

    def register_round(
        self, cohort: Cohort, member: Member, weights: dict[str, np.ndarray], model_name: str
    ) -> Session:
        """A split round session for ``member`` on the wire it negotiated, with its cache."""
        spec = cohort.specs[member.device_class]
        version = self.split.teachers.current().version
        session: Session = self.split.register(
            member.device_id,
            self.split.teacher.signature,
            requested_epochs=cohort.config.local_epochs,
            student_spec=spec,
            initial_state=weights,
            model_name=model_name,
            persist=False,
            ask=round_ask(cohort.config, member),
            cache=self.cache_for(member, spec, version),
        )
        if session.cache is not None and session.teacher_version != version:
            # The teacher changed while registering: the cache must hold this version's outputs.
            session.cache = self.cache_for(member, spec, session.teacher_version)
        return session
