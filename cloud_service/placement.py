"""Where a new session goes: an even spread over the replicas.

Hashing a few dozen devices onto three replicas spreads them unevenly (a
binomial draw). So a replica that already holds more sessions than the
emptiest other one refuses a Register with UNAVAILABLE while Envoy may still
retry it elsewhere (its ``x-envoy-attempt-count``); Envoy's retry goes to the
next replica, which accepts, and names itself in the answer (Envoy's
stateful-session header, deploy/envoy/envoy.yaml), which the edge sends back
with every later call. Each replica publishes its count in the shared store
(``replicas/NAME.json``) after each registration and every few seconds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from cloud_service.storage import RetryingStore, check_key
from splitkd.errors import Unavailable

log = logging.getLogger(__name__)
# A replica silent this long is gone (or its count too old to compare with).
STALE_SECONDS = 15.0


class LoadBoard:
    def __init__(
        self,
        store: RetryingStore,
        replica: str,
        sessions: Callable[[], int],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.key = check_key(f"replicas/{replica}.json")
        self.sessions = sessions
        self._clock = clock

    def publish(self) -> None:
        record = {"sessions": self.sessions(), "at": self._clock()}
        self.store.write(self.key, json.dumps(record).encode())

    def others(self) -> list[int]:
        """The session counts the other live replicas published."""
        counts = []
        for key in self.store.list("replicas/"):
            if key == self.key:
                continue
            try:
                record = json.loads(self.store.read(key) or b"{}")
                if self._clock() - float(record["at"]) < STALE_SECONDS:
                    counts.append(int(record["sessions"]))
            except (ValueError, KeyError, TypeError):
                continue
        return counts

    def place(self, attempt: int, attempts: int) -> None:
        """Refuse a new session (UNAVAILABLE) if another replica should take it.

        ``attempt``: Envoy's attempt count (0: not behind Envoy, always accept);
        the last attempt is always accepted, so a Register never fails for this.
        """
        if not 0 < attempt < attempts:
            return
        others = self.others()
        mine = self.sessions()
        if others and mine > min(others):
            raise Unavailable(
                f"this replica holds {mine} sessions, another {min(others)}: placed elsewhere"
            )
