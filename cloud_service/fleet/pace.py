"""When a waiting device should ask again: about when its cohort's round is closed.

Devices poll (unary calls, ``RoundTask.retry_after_seconds``). While the cloud closes
a round (FedAvg, then seconds of knowledge transfer in a federated cohort) a device
asking every half-second pays a call's bytes each time, several per round: on the
frugal weights wire (``fleet/weights.py``) as much as the weights themselves. The
cloud knows how long its last close of the cohort took and tells a device asking
during a close to come back about when this one should be done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cloud_service.fleet.cohort import RETRY_AFTER_SECONDS

# Never longer than this: a close that turns out quicker costs a device at most this.
MAX_RETRY_AFTER_SECONDS = 10.0


class ClosePace:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._began: dict[str, float] = {}
        self._took: dict[str, float] = {}

    def began(self, cohort: str) -> None:
        with self._lock:
            self._began[cohort] = self.clock()

    def ended(self, cohort: str) -> None:
        with self._lock:
            began = self._began.get(cohort)
            if began is not None:
                self._took[cohort] = self.clock() - began

    def retry_after(self, cohort: str, closing: bool) -> float:
        """Seconds until a device should ask again (``closing``: a close is under way)."""
        with self._lock:
            began, took = self._began.get(cohort), self._took.get(cohort)
        if not closing or began is None or took is None:
            return RETRY_AFTER_SECONDS
        left = 0.9 * took - (self.clock() - began)  # a little early rather than late
        return min(MAX_RETRY_AFTER_SECONDS, max(RETRY_AFTER_SECONDS, left))
