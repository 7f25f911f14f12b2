"""One of several cloud replicas: sessions shared through storage, owned by leases.

Envoy routes a device's calls to one replica (consistent hashing on the
routing key, see deploy/envoy/). When that replica dies, or a call comes
without the key, the session's next call lands on another replica, which:

1. takes the session's lease (``cloud_service.leases``) once the old
   holder's lease has run out (a replica that stopped cleanly released it);
2. restores the session from its newest shared checkpoint;
3. answers the edge's step with FAILED_PRECONDITION ("out of order"), and
   the edge agrees on a common step through the Resume protocol it already
   uses after a cloud restart.

Until then the edge is answered UNAVAILABLE, which it retries. A replica
that finds its lease taken drops the session from memory, so two replicas
never apply steps of one session.
"""

from __future__ import annotations

import logging
import threading

from cloud_service.checkpoints import SESSION_ID, SessionCheckpoints
from cloud_service.leases import Leases
from cloud_service.service import CloudService
from cloud_service.session import Session
from cloud_service.storage import RetryingStore
from splitkd.errors import Unavailable

log = logging.getLogger(__name__)


class Replica:
    def __init__(self, service: CloudService, leases: Leases) -> None:
        if service.checkpoints is None:
            raise ValueError("a replica needs shared session checkpoints")
        self.service = service
        self.checkpoints: SessionCheckpoints = service.checkpoints
        self.leases = leases
        self._load_lock = threading.Lock()
        service.leases = leases
        service.sessions.loader = self.load
        service.sessions.guard = self.guard
        service.sessions.on_expire = self._expired

    def load(self, session_id: str) -> Session | None:
        """A session this replica does not hold: restore it from shared storage, if any."""
        if not SESSION_ID.fullmatch(session_id):
            return None
        with self._load_lock:  # one restore per session, however many calls race for it
            here = self.service.sessions.peek(session_id)
            if here is not None:
                return here
            if not self.checkpoints.exists(session_id):
                return None
            if not self.leases.holds(session_id):
                raise Unavailable(
                    f"session {session_id[:8]}… is served by another replica; try again shortly"
                )
            self.leases.taken_from_other(session_id)  # loaded fresh now: nothing stale
            session = self.checkpoints.load(session_id, self.service.teachers)
            if session is None:
                self.leases.release(session_id)
                return None
            self.service.sessions.restore(session)
        log.info(
            "session %s… of %s taken over at step %d from shared storage",
            session_id[:8],
            session.device_id,
            session.next_step,
        )
        return session

    def guard(self, session: Session) -> None:
        """Refuse (and forget) a session whose lease another replica holds now."""
        if not session.persisted or session.finished_version is not None:
            return
        if not self.leases.holds(session.session_id):
            self.service.sessions.remove(session.session_id)
            raise Unavailable(
                f"session {session.session_id[:8]}… moved to another replica; try again shortly"
            )
        if self.leases.taken_from_other(session.session_id):
            # Back after another replica served it: its shared checkpoints are newer than
            # what this one remembers. Forget that; the retry restores them.
            self.service.sessions.remove(session.session_id)
            raise Unavailable(f"session {session.session_id[:8]}… is being restored; try again")

    def _expired(self, session: Session) -> None:
        # Files of a session that moved away belong to its new holder: not ours to delete.
        if self.leases.held(session.session_id):
            self.checkpoints.remove(session.session_id)
        self.leases.forget(session.session_id)

    def release_all(self) -> int:
        """On a clean stop (after checkpoint_all): hand every session over at once."""
        owned = self.leases.owned()
        for session_id in owned:
            self.leases.release(session_id)
        return len(owned)

    @property
    def store(self) -> RetryingStore:
        return self.leases.store
