"""Session store: creation with limits, lookup, expiry of silent sessions."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

from cloud_service.session import Session
from splitkd.errors import NotFound, ResourceExhausted

# A device that goes silent for this long is gone (rebooted, unplugged); its
# session's memory is freed. Long enough for a slow device's slowest step.
DEFAULT_IDLE_TIMEOUT_SECONDS = 900.0
DEFAULT_MAX_SESSIONS = 256
DEFAULT_MAX_SESSIONS_PER_DEVICE = 4


class SessionStore:
    def __init__(
        self,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_per_device: int = DEFAULT_MAX_SESSIONS_PER_DEVICE,
        clock: Callable[[], float] = time.monotonic,
        on_expire: Callable[[Session], None] | None = None,
    ) -> None:
        self.on_expire = on_expire
        self._last_sweep = float("-inf")
        self._sessions: dict[str, Session] = {}
        self._expired: set[str] = set()
        self._lock = threading.Lock()
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.max_per_device = max_per_device
        self._clock = clock

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def add(self, session: Session) -> None:
        with self._lock:
            self._expire_locked()
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"the cloud already serves {self.max_sessions} sessions; try again later"
                )
            mine = [s for s in self._sessions.values() if s.device_id == session.device_id]
            finished = sorted(
                (s for s in mine if s.finished_version is not None), key=lambda s: s.last_seen
            )
            while len(mine) >= self.max_per_device and finished:
                # A finished session is only kept to answer a repeated Finish: drop the oldest.
                oldest = finished.pop(0)
                mine.remove(oldest)
                del self._sessions[oldest.session_id]
            if len(mine) >= self.max_per_device:
                raise ResourceExhausted(
                    f"device {session.device_id} already has {len(mine)} unfinished sessions (the limit); "
                    "resume one of them (splitkd-edge train resumes automatically) or wait "
                    f"{self.idle_timeout:.0f} s for idle ones to expire"
                )
            session.last_seen = self._clock()
            self._sessions[session.session_id] = session

    def get(self, session_id: str) -> Session:
        with self._lock:
            # Every RPC looks a session up: sweep the others once a second, not per call.
            self._expire_locked(sweep_every=1.0)
            session = self._sessions.get(session_id)
            if session is not None and self._clock() - session.last_seen > self.idle_timeout:
                self._expire_one_locked(session)
                session = None
            if session is None:
                if session_id in self._expired:
                    raise NotFound(
                        f"session {session_id[:8]}… expired after {self.idle_timeout:.0f} s of silence; register again"
                    )
                raise NotFound("unknown session; register again to get a new one")
            session.last_seen = self._clock()
            return session

    def remove(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def all(self) -> list[Session]:
        with self._lock:
            self._expire_locked()
            return list(self._sessions.values())

    def active(self) -> int:
        """Sessions still training (finished ones are kept only to answer a repeated Finish)."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.finished_version is None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire_locked(self, sweep_every: float = 0.0) -> None:
        """Drop silent sessions; with ``sweep_every``, at most that often (hot paths)."""
        now = self._clock()
        if now - self._last_sweep < sweep_every:
            return
        self._last_sweep = now
        for session in list(self._sessions.values()):
            if now - session.last_seen > self.idle_timeout:
                self._expire_one_locked(session)

    def _expire_one_locked(self, session: Session) -> None:
        del self._sessions[session.session_id]
        self._expired.add(session.session_id)
        if self.on_expire is not None:
            self.on_expire(session)
        if len(self._expired) > 10_000:  # bounded memory of expired ids
            self._expired.clear()
