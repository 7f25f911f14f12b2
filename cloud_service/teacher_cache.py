"""The teacher's outputs per sample of a session, computed once (the frugal wire).

The teacher is frozen within a session (it pins a teacher version), so its tail
output for a sample is the same in every epoch: the edge sends a sample's
teacher activations and label once, the cloud keeps the tail's logits here, and
later steps name the sample by its position in the device's own training order.
Positions are the device's bookkeeping, never a function of the data.

Memory is bounded: a session's cache holds at most the samples it was granted
at Register, and the service grants caches only while the sum over sessions
stays within its budget (``--teacher-cache-mb``).
"""

from __future__ import annotations

import numpy as np
import torch

from splitkd.errors import FailedPrecondition, InvalidArgument
from splitkd.models.spec import ModelSpec, labels_per_sample
from splitkd.names import TEACHER_CACHE_MISS as CACHE_MISS


def for_spec(capacity: int, spec: ModelSpec) -> TeacherCache:
    """A cache for ``capacity`` samples of the task ``spec`` (the student's) solves."""
    labels = labels_per_sample(spec)
    return TeacherCache(capacity, labels * spec.num_classes, labels)


class TeacherCache:
    """Per sample: the teacher tail's ``outputs`` logits and ``labels`` labels (a classifier:
    num_classes and 1; a language model: context x vocabulary and context)."""

    def __init__(self, capacity: int, outputs: int, labels: int = 1) -> None:
        self.capacity = capacity
        self.outputs = outputs
        self.labels = labels
        # Allocated on first use: a session that never steps costs nothing.
        self._logits: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._filled: np.ndarray | None = None
        self._shape: tuple[int, ...] = ()  # a batch's logits, without the batch

    @staticmethod
    def bytes_for(capacity: int, outputs: int, labels: int = 1) -> int:
        """What a cache of ``capacity`` samples takes: float32 logits, int32 labels, a flag."""
        return capacity * (4 * outputs + 4 * labels + 1)

    @property
    def reserved_bytes(self) -> int:
        return self.bytes_for(self.capacity, self.outputs, self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now (0 until the first sample is cached)."""
        parts = (self._logits, self._labels, self._filled)
        return sum(p.nbytes for p in parts if p is not None)

    @property
    def samples(self) -> int:
        return 0 if self._filled is None else int(self._filled.sum())

    def check_ids(self, ids: np.ndarray, batch: int) -> np.ndarray:
        if ids.shape != (batch,):
            raise InvalidArgument(f"sample_ids have shape {list(ids.shape)}, expected [{batch}]")
        if batch and (ids.min() < 0 or ids.max() >= self.capacity):
            raise InvalidArgument(
                f"sample_ids must be in 0..{self.capacity - 1} (the train_samples granted)"
            )
        if len(np.unique(ids)) != batch:
            raise InvalidArgument("sample_ids repeat a sample within one batch")
        return ids.astype(np.int64)

    def put(self, ids: np.ndarray, logits: torch.Tensor, labels: np.ndarray) -> None:
        batch = len(ids)
        if self._logits is None:
            self._logits = np.zeros((self.capacity, self.outputs), dtype=np.float32)
            self._labels = np.zeros((self.capacity, self.labels), dtype=np.int32)
            self._filled = np.zeros(self.capacity, dtype=bool)
            self._shape = tuple(logits.shape[1:])
        assert self._labels is not None and self._filled is not None
        self._logits[ids] = logits.detach().numpy().reshape(batch, self.outputs)
        self._labels[ids] = labels.reshape(batch, self.labels)
        self._filled[ids] = True

    def get(self, ids: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The cached logits and (flat) labels of ``ids``; FAILED_PRECONDITION for any missing."""
        missing = ids if self._filled is None else ids[~self._filled[ids]]
        if len(missing):
            raise FailedPrecondition(
                f"{CACHE_MISS}: the cloud holds no teacher outputs for {len(missing)} samples "
                f"of this batch (e.g. sample {int(missing[0])}; the cloud restarted or never got "
                "them): send the step again with its teacher activations and labels"
            )
        assert self._logits is not None and self._labels is not None
        logits = self._logits[ids].reshape(len(ids), *self._shape)
        return torch.from_numpy(logits), self._labels[ids].reshape(-1).astype(np.int64)

    def clear(self) -> None:
        self._logits = self._labels = self._filled = None
