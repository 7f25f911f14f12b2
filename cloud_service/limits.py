"""Per-device rate limits: one device flooding steps gets RESOURCE_EXHAUSTED, not everyone a slowdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from splitkd.errors import ResourceExhausted

# A default-model step takes ~5 ms on loopback, so an honest edge makes at most
# ~200 steps/s; 400/s with a burst of 100 never touches one, and caps a runaway.
DEFAULT_STEPS_PER_SECOND = 400.0
DEFAULT_BURST = 100


class RateLimiter:
    """A token bucket per key (device id): ``rate`` tokens a second, at most ``burst`` saved."""

    def __init__(
        self,
        rate: float = DEFAULT_STEPS_PER_SECOND,
        burst: int = DEFAULT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def acquire(self, key: str, what: str = "calls") -> None:
        if self.rate <= 0:
            return  # unlimited
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise ResourceExhausted(
                    f"device {key} sends more than {self.rate:.0f} {what} per second; slow down"
                )
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:  # forget idle devices: bounded memory
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
