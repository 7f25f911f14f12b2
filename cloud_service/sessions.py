"""Session store: creation with limits, lookup, expiry of silent sessions.

A registered session is *pending* until its first step lands: it sits in a
small pool, evicted oldest-first, holds no capacity and is never written to
disk. Registering costs a caller nothing durable, so a flood of Register
calls (anyone may call it when no device is enrolled) can neither fill the
cloud nor survive a restart. Its first step makes it *active*: only then
does it count against the caps (and get checkpointed, see CloudService).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from cloud_service.limits import UNKNOWN_SESSION
from cloud_service.session import Session
from splitkd.errors import NotFound, ResourceExhausted

# A device that goes silent for this long is gone (rebooted, unplugged); its
# session's memory is freed. Long enough for a slow device's slowest step.
DEFAULT_IDLE_TIMEOUT_SECONDS = 900.0
DEFAULT_MAX_SESSIONS = 256
DEFAULT_MAX_SESSIONS_PER_DEVICE = 4
# Registered but not yet stepped: an honest edge steps within a second of
# registering, so a pool this size is only ever full under a flood.
DEFAULT_MAX_PENDING = 128


class SessionStore:
    def __init__(
        self,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_per_device: int = DEFAULT_MAX_SESSIONS_PER_DEVICE,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
        on_expire: Callable[[Session], None] | None = None,
    ) -> None:
        # Called for every active session dropped (expired, displaced), outside the lock.
        self.on_expire = on_expire
        # Replicas (CloudService.share): a session unknown here may be restored from shared
        # storage (``loader``), and one known here may have moved to another replica (``guard``).
        self.loader: Callable[[str], Session | None] | None = None
        self.guard: Callable[[Session], None] | None = None
        self._last_sweep = float("-inf")
        self._sessions: dict[str, Session] = {}
        self._pending: OrderedDict[str, Session] = OrderedDict()
        self._expired: set[str] = set()
        self._dropped: list[Session] = []
        self._lock = threading.Lock()
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.max_per_device = max_per_device
        self.max_pending = max_pending
        self._clock = clock

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def add(self, session: Session) -> None:
        """A new registration: pending until its first step (see the module docstring)."""
        with self._lock:
            self._expire_locked()
            self._make_room_locked(session.device_id, exclude=session.session_id)
            session.last_seen = self._clock()
            self._pending[session.session_id] = session
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
        self._run_dropped()

    def activate(self, session: Session) -> bool:
        """Count ``session`` against the caps from now on; True if it was pending."""
        with self._lock:
            if self._pending.pop(session.session_id, None) is None:
                return False
            try:
                self._make_room_locked(session.device_id, exclude=session.session_id)
            except ResourceExhausted:
                self._pending[session.session_id] = session
                raise
            self._sessions[session.session_id] = session
        self._run_dropped()
        return True

    def restore(self, session: Session) -> None:
        """A session from disk: it trained, so it is active (room permitting)."""
        with self._lock:
            self._make_room_locked(session.device_id, exclude=session.session_id)
            session.last_seen = self._clock()
            self._sessions[session.session_id] = session
        self._run_dropped()

    def _make_room_locked(self, device_id: str, exclude: str) -> None:
        """Room for one more active session of ``device_id``, or RESOURCE_EXHAUSTED.

        A finished session is kept only to answer a repeated Finish, so it gives
        way first. A device at its own cap then gives up its least recently seen
        unfinished session: after a few crashes, a device's earlier runs are
        abandoned, and it must not be locked out until they expire.
        """
        live = [s for s in self._sessions.values() if s.session_id != exclude]
        mine = [s for s in live if s.device_id == device_id]
        while len(mine) >= self.max_per_device and mine:
            oldest = min(mine, key=lambda s: (s.finished_version is None, s.last_seen))
            mine.remove(oldest)
            self._drop_locked(oldest)
        finished = sorted(
            (s for s in self._sessions.values() if s.finished_version is not None), key=_seen
        )
        unfinished = sum(1 for s in self._sessions.values() if s.finished_version is None)
        while len(self._sessions) >= self.max_sessions and finished:
            self._drop_locked(finished.pop(0))
        if unfinished >= self.max_sessions:
            raise ResourceExhausted(
                f"the cloud already serves {self.max_sessions} sessions; try again later"
            )

    def get(self, session_id: str) -> Session:
        try:
            session, active = self._get_here(session_id)
        except NotFound:
            restored = self.loader(session_id) if self.loader is not None else None
            if restored is None:
                raise
            return restored
        if active and self.guard is not None:
            self.guard(session)
        return session

    def peek(self, session_id: str) -> Session | None:
        """The active session if this cloud holds it (no expiry, no hooks)."""
        with self._lock:
            return self._sessions.get(session_id)

    def _get_here(self, session_id: str) -> tuple[Session, bool]:
        with self._lock:
            # Every RPC looks a session up: sweep the others once a second, not per call.
            self._expire_locked(sweep_every=1.0)
            session = self._sessions.get(session_id) or self._pending.get(session_id)
            if session is not None and self._clock() - session.last_seen > self.idle_timeout:
                self._expire_one_locked(session)
                session = None
            if session is not None:
                session.last_seen = self._clock()
            expired = session_id in self._expired
            active = session_id in self._sessions
        self._run_dropped()
        if session is None:
            if expired:
                raise NotFound(
                    f"session {session_id[:8]}… expired after {self.idle_timeout:.0f} s of silence; register again"
                )
            raise NotFound(UNKNOWN_SESSION)
        return session, active

    def remove(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)
            self._pending.pop(session_id, None)

    def all(self) -> list[Session]:
        """Every session that trained (pending ones are not worth listing or saving)."""
        with self._lock:
            self._expire_locked()
            sessions = list(self._sessions.values())
        self._run_dropped()
        return sessions

    def with_pending(self) -> list[Session]:
        """Every session, pending ones too (what holds a reservation, e.g. a teacher cache)."""
        with self._lock:
            return [*self._sessions.values(), *self._pending.values()]

    def active(self) -> int:
        """Sessions still training (finished ones are kept only to answer a repeated Finish)."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.finished_version is None)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire_locked(self, sweep_every: float = 0.0) -> None:
        """Drop silent sessions; with ``sweep_every``, at most that often (hot paths)."""
        now = self._clock()
        if now - self._last_sweep < sweep_every:
            return
        self._last_sweep = now
        for session in [*self._sessions.values(), *self._pending.values()]:
            if now - session.last_seen > self.idle_timeout:
                self._expire_one_locked(session)

    def _expire_one_locked(self, session: Session) -> None:
        self._expired.add(session.session_id)
        if len(self._expired) > 10_000:  # bounded memory of expired ids
            self._expired.clear()
        if self._pending.pop(session.session_id, None) is None:
            self._drop_locked(session)

    def _drop_locked(self, session: Session) -> None:
        """Forget an active session now; its files go once the lock is released."""
        del self._sessions[session.session_id]
        self._dropped.append(session)

    def _run_dropped(self) -> None:
        """``on_expire`` for sessions dropped meanwhile, outside the lock: deleting
        files must not stall every other RPC's session lookup."""
        if not self._dropped:  # the common case, without taking the lock again
            return
        with self._lock:
            dropped, self._dropped = self._dropped, []
        if self.on_expire is not None:
            for session in dropped:
                self.on_expire(session)


def _seen(session: Session) -> float:
    return session.last_seen
