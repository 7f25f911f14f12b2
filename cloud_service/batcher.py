"""Micro-batching of teacher tails across the sessions of one replica.

Every step runs the frozen teacher's tail on its batch. With many edges, one
forward pass per step pays PyTorch's per-call overhead (module dispatch, small
kernels) again and again; concatenating the steps that arrive together into
one pass pays it once. The teacher is frozen and in eval mode, so each
sample's logits do not depend on its batch neighbours.

Leader and followers, no extra thread: the first caller for a (teacher, cut,
shape) becomes the leader; callers arriving while a batch computes queue up
and the next leader takes them all in one pass. Under load the leader also
waits a short, bounded window for more; alone (no batch of two in the last
moment) it never waits, so one edge's latency is untouched and its arithmetic
is exactly that of an unbatched pass.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cloud_service.compute import TENSOR_WORK
from splitkd.models.staged import StagedModel

# Bounded: the wait is at most this, and only under load.
DEFAULT_WINDOW_SECONDS = 0.002
# A batch large enough to amortise overhead, small enough to stay in cache.
DEFAULT_MAX_SAMPLES = 1024
# "Under load": a batch of two or more was formed this recently.
_LOAD_MEMORY_SECONDS = 0.1


@dataclass
class _Request:
    activations: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: tuple[torch.Tensor, float] | None = None
    error: BaseException | None = None


@dataclass
class _Queue:
    waiting: list[_Request] = field(default_factory=list)
    busy: bool = False
    last_shared: float = float("-inf")


class TeacherBatcher:
    def __init__(
        self,
        *,
        enabled: bool = True,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        max_samples: int = DEFAULT_MAX_SAMPLES,
    ) -> None:
        self.enabled = enabled
        self.window_seconds = window_seconds
        self.max_samples = max_samples
        self.batches = 0  # passes run, and the steps they served (for metrics and tests)
        self.requests = 0
        self._lock = threading.Lock()
        self._queues: dict[tuple[object, ...], _Queue] = {}

    def run(
        self, teacher: StagedModel, cut: int, activations: np.ndarray
    ) -> tuple[torch.Tensor, float]:
        """The teacher tail's logits for ``activations`` and the seconds its pass took."""
        if not self.enabled:
            return _forward(teacher, cut, activations)
        key = (id(teacher), cut, activations.shape[1:])
        request = _Request(activations)
        with self._lock:
            queue = self._queues.setdefault(key, _Queue())
            queue.waiting.append(request)
            request.lead = not queue.busy
            queue.busy = True
        if not request.lead:
            request.done.wait()
        if request.lead and request.result is None:
            self._lead(queue, teacher, cut)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _lead(self, queue: _Queue, teacher: StagedModel, cut: int) -> None:
        if time.monotonic() - queue.last_shared < _LOAD_MEMORY_SECONDS:
            self._fill(queue)
        with self._lock:
            batch: list[_Request] = []
            total = 0
            while queue.waiting and (
                not batch or total + len(queue.waiting[0].activations) <= self.max_samples
            ):
                batch.append(queue.waiting.pop(0))
                total += len(batch[-1].activations)
            if len(batch) > 1:
                queue.last_shared = time.monotonic()
        try:
            self._compute(batch, teacher, cut)
        finally:
            with self._lock:
                self.batches += 1
                self.requests += len(batch)
                if queue.waiting:  # hand over: the next in line leads the next pass
                    queue.waiting[0].lead = True
                    queue.waiting[0].done.set()
                else:
                    queue.busy = False
            for request in batch:
                request.done.set()

    def _fill(self, queue: _Queue) -> None:
        """Wait up to the window for more steps (only under load: see the module docstring)."""
        deadline = time.monotonic() + self.window_seconds
        while time.monotonic() < deadline:
            with self._lock:
                if sum(len(r.activations) for r in queue.waiting) >= self.max_samples:
                    return
            time.sleep(self.window_seconds / 4)

    @staticmethod
    def _compute(batch: list[_Request], teacher: StagedModel, cut: int) -> None:
        try:
            if len(batch) == 1:
                batch[0].result = _forward(teacher, cut, batch[0].activations)
                return
            logits, seconds = _forward(teacher, cut, np.concatenate([r.activations for r in batch]))
            start = 0
            for request in batch:
                end = start + len(request.activations)
                # A copy: a session keeps its logits, not the whole batch alive.
                request.result = (logits[start:end].clone(), seconds)
                start = end
        except BaseException as exc:  # every waiter hears it, none hangs
            for request in batch:
                request.error = exc


def _forward(teacher: StagedModel, cut: int, activations: np.ndarray) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    # Grad mode is per thread: set it here. One pass at a time with the steps (compute.py).
    with TENSOR_WORK, torch.no_grad():
        logits = teacher.run(
            torch.from_numpy(activations.astype(np.float32)), cut, len(teacher.stages)
        )
    return logits, time.perf_counter() - started


# One per process: every session of this replica shares it (splitkd-cloud serve configures it).
TEACHER_BATCHER = TeacherBatcher()
