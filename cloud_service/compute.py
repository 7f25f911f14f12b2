"""One step's tensor work at a time in a replica: no GIL convoy.

Every PyTorch call releases the GIL and takes it back. With many gRPC worker
threads each in the middle of a step, each of those hand-overs is a contended
wake-up: measured in-process (16 threads, 16 sessions, the loadtest's digits
steps), a step cost ~2.3-2.6 ms of CPU when threads ran their tensor work
freely and ~1.5-1.7 ms when they took turns (one thread alone: ~1.4 ms).
``splitkd-cloud serve`` runs PyTorch on one intra-op thread and a step's
tensors are small, so taking turns costs no parallelism worth having; it only
removes the fight over the GIL. Decoding, encoding, locks, waits and file
writes stay outside the turn, in parallel.

Large models (long kernels, during which the GIL is free for another thread's
kernel) on several cores may do better without turns:
``splitkd-cloud serve --parallel-tensor-work``.

A leaf lock: nothing that holds it waits for anything else (not for a teacher
batch, a prefetch, a session's lock or a checkpoint), so it cannot deadlock.
"""

from __future__ import annotations

import threading
from types import TracebackType


class TensorTurns:
    """A lock taken around tensor work, or nothing when ``enabled`` is False.

    Set ``enabled`` before serving; each thread remembers whether it took the
    lock, so a change while a turn is held is harmless anyway.
    """

    def __init__(self) -> None:
        self.enabled = True
        self._lock = threading.Lock()
        self._mine = threading.local()

    def __enter__(self) -> None:
        held = self.enabled
        if held:
            self._lock.acquire()
        self._mine.held = held

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._mine.held:
            self._mine.held = False
            self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


# One per process: every session and the teacher batcher take their turns here.
TENSOR_WORK = TensorTurns()
