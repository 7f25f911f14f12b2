"""Which replica owns a session: leases made of conditional writes.

A session's lease is a series of objects ``sessions/ID/lease-GGGGGGGGG``
(generation G, JSON ``{"holder", "expires"}``). Taking a session over means
creating the next generation with a conditional create: of two replicas that
try at once, exactly one wins. The holder renews its own generation (a plain
write) when half its time is gone, then checks that no next generation
appeared; it applies steps only while its lease is valid by its own clock,
minus a margin. A contender takes over only once the top generation has
expired, so two replicas never apply steps of one session at the same time.

A replica that crashed holds its sessions until their leases expire; one
that stops cleanly releases them (expiry 0) so another takes over at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud_service.storage import RetryingStore

log = logging.getLogger(__name__)
_PREFIX = "lease-"


@dataclass
class Held:
    generation: int
    expires: float
    not_before: float = 0.0  # a previous holder's renewal may have raced our take-over
    # Taken from another replica: what this one remembers of the session may be stale.
    from_other: bool = False


def lease_key(session_id: str, generation: int, prefix: str = "sessions/") -> str:
    return f"{prefix}{session_id}/{_PREFIX}{generation:09d}"


class Leases:
    def __init__(
        self,
        store: RetryingStore,
        replica: str,
        seconds: float,
        *,
        prefix: str = "sessions/",
        clock: Callable[[], float] = time.time,
        kind: str = "session",
    ) -> None:
        """``prefix``: where sessions sit in ``store`` (as for SessionCheckpoints);
        ``kind``: what is leased, in log lines (cohorts are leased too, fleet/shared.py)."""
        self.store = store
        self.prefix = prefix
        self.kind = kind
        self.replica = replica
        self.seconds = seconds
        # A step in flight when the lease runs out must still finish inside it.
        self.margin = min(2.0, seconds / 5)
        self._clock = clock
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def holds(self, session_id: str) -> bool:
        """True when this replica may serve the session now (taking or renewing its lease)."""
        with self._lock:
            held = self._held.get(session_id)
            now = self._clock()
            if held is not None and now < held.expires - self.margin:
                if now >= held.expires - self.seconds / 2:
                    self._renew(session_id, held, now)
                held = self._held.get(session_id)
                return held is not None and now >= held.not_before
            self._held.pop(session_id, None)
            return self._acquire(session_id, now)

    def _key(self, session_id: str, generation: int) -> str:
        return lease_key(session_id, generation, self.prefix)

    def taken_from_other(self, session_id: str) -> bool:
        """True once after this replica took the session from another one (then: reload it)."""
        with self._lock:
            held = self._held.get(session_id)
            if held is None or not held.from_other:
                return False
            held.from_other = False
            return True

    def held(self, session_id: str) -> bool:
        """Whether this replica holds the session's lease now (no storage call)."""
        with self._lock:
            held = self._held.get(session_id)
            return held is not None and self._clock() < held.expires - self.margin

    def owned(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def _generations(self, session_id: str) -> list[int]:
        prefix = f"{self.prefix}{session_id}/"
        out = []
        for key in self.store.list(prefix):
            name = key[len(prefix) :]
            if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit():
                out.append(int(name[len(_PREFIX) :]))
        return sorted(out)

    def _read(self, session_id: str, generation: int) -> tuple[str, float]:
        raw = self.store.read(self._key(session_id, generation))
        try:
            record = json.loads(raw or b"{}")
            return str(record["holder"]), float(record["expires"])
        except (ValueError, KeyError, TypeError):
            return "", 0.0  # unreadable: treated as expired, the next generation decides

    def _record(self, expires: float) -> bytes:
        return json.dumps({"holder": self.replica, "expires": expires}).encode()

    def _acquire(self, session_id: str, now: float) -> bool:
        generations = self._generations(session_id)
        top = generations[-1] if generations else 0
        previous_expiry = 0.0
        if generations:
            holder, previous_expiry = self._read(session_id, top)
            # Our own name: an earlier life of this replica (same id), which is gone.
            if holder != self.replica and previous_expiry > now:
                return False
        expires = now + self.seconds
        if not self.store.create(self._key(session_id, top + 1), self._record(expires)):
            return False  # another replica won the race
        not_before = 0.0
        from_other = bool(generations) and holder != self.replica
        if generations:
            # The holder may have renewed just as we read: then wait out its renewal.
            holder, renewed = self._read(session_id, top)
            if holder != self.replica and renewed > previous_expiry:
                not_before = renewed
            for old in generations[:-1]:
                self.store.delete(self._key(session_id, old))
        self._held[session_id] = Held(top + 1, expires, not_before, from_other)
        log.info("%s %s…: lease generation %d taken", self.kind, session_id[:8], top + 1)
        return now >= not_before

    def _renew(self, session_id: str, held: Held, now: float) -> None:
        expires = now + self.seconds
        self.store.write(self._key(session_id, held.generation), self._record(expires))
        if self.store.read(self._key(session_id, held.generation + 1)) is not None:
            log.warning("%s %s…: another replica took it over", self.kind, session_id[:8])
            del self._held[session_id]
            return
        held.expires = expires

    def release(self, session_id: str) -> None:
        """Give the session up now (a clean stop): another replica may take it at once."""
        with self._lock:
            held = self._held.pop(session_id, None)
            if held is not None:
                self.store.write(self._key(session_id, held.generation), self._record(0.0))

    def forget(self, session_id: str) -> None:
        """The session ended here (finished, expired): its lease files go with its others."""
        with self._lock:
            self._held.pop(session_id, None)
