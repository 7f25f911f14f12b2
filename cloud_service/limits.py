"""Per-device rate limits: one device flooding steps gets RESOURCE_EXHAUSTED, not everyone a slowdown."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from splitkd.errors import InvalidArgument, ResourceExhausted

# Names a device sends about itself (profiles, links): short tokens, shown in
# logs, metrics and /v1/sessions, so never megabytes or control characters.
_LABEL = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
MAX_FREE_TEXT = 256
# Also the answer for another device's session (cloud_service/auth.py): the same words.
UNKNOWN_SESSION = "unknown session; register again to get a new one"
# A session id is 32 hex digits; anything much longer is not one.
MAX_SESSION_ID = 64


def shown(value: str, limit: int = 64) -> str:
    """``value`` quoted for an error message, cut short: never echo a peer's megabytes."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value)} characters)"


def check_label(value: str, what: str) -> str:
    if not _LABEL.fullmatch(value):
        raise InvalidArgument(
            f"{what} {shown(value)} must be at most 64 letters, digits, '.', '_' or '-'"
        )
    return value


def check_free_text(value: str, what: str) -> str:
    """Informative text (e.g. a data set's name): bounded and printable."""
    if len(value) > MAX_FREE_TEXT or not value.isprintable():
        raise InvalidArgument(
            f"{what} must be at most {MAX_FREE_TEXT} printable characters, got {shown(value)}"
        )
    return value


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
