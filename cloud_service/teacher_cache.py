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
from splitkd.names import TEACHER_CACHE_MISS as CACHE_MISS


class TeacherCache:
    def __init__(self, capacity: int, num_classes: int) -> None:
        self.capacity = capacity
        self.num_classes = num_classes
        # Allocated on first use: a session that never steps costs nothing.
        self._logits: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._filled: np.ndarray | None = None

    @staticmethod
    def bytes_for(capacity: int, num_classes: int) -> int:
        """What a cache of ``capacity`` samples takes: float32 logits, int32 label, a flag."""
        return capacity * (4 * num_classes + 4 + 1)

    @property
    def reserved_bytes(self) -> int:
        return self.bytes_for(self.capacity, self.num_classes)

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
        if self._logits is None:
            self._logits = np.zeros((self.capacity, self.num_classes), dtype=np.float32)
            self._labels = np.zeros(self.capacity, dtype=np.int32)
            self._filled = np.zeros(self.capacity, dtype=bool)
        assert self._labels is not None and self._filled is not None
        self._logits[ids] = logits.detach().numpy()
        self._labels[ids] = labels
        self._filled[ids] = True

    def get(self, ids: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The cached logits and labels of ``ids``; FAILED_PRECONDITION for any missing."""
        missing = ids if self._filled is None else ids[~self._filled[ids]]
        if len(missing):
            raise FailedPrecondition(
                f"{CACHE_MISS}: the cloud holds no teacher outputs for {len(missing)} samples "
                f"of this batch (e.g. sample {int(missing[0])}; the cloud restarted or never got "
                "them): send the step again with its teacher activations and labels"
            )
        assert self._logits is not None and self._labels is not None
        return torch.from_numpy(self._logits[ids]), self._labels[ids].astype(np.int64)

    def clear(self) -> None:
        self._logits = self._labels = self._filled = None
