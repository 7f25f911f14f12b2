"""The device's feedback store: users' corrections (inputs + the right label), in SQLite.

Stays on the device: nothing here is ever sent anywhere; ``splitkd-edge adapt
--feedback`` learns from it locally. WAL journal with ``synchronous=FULL``: a
correction acknowledged to the user survives a power cut. Bounded by a number
of records: a full store refuses new ones (the HTTP API answers 507) and keeps
what it has. Inputs are stored as float32 bytes with their shape, never pickled.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitkd.errors import InvalidArgument, ResourceExhausted

DEFAULT_MAX_RECORDS = 10_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    label INTEGER NOT NULL,
    shape TEXT NOT NULL,
    inputs BLOB NOT NULL
)
"""


class StoreFull(ResourceExhausted):
    """The store holds its maximum number of records."""


@dataclass(frozen=True)
class FeedbackStats:
    records: int
    max_records: int
    per_label: dict[int, int]
    oldest: float | None
    newest: float | None


class FeedbackStore:
    def __init__(self, path: Path, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records < 1:
            raise InvalidArgument(f"the feedback store's size must be >= 1, got {max_records}")
        self.path = path
        self.max_records = max_records
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the API's threads, serialised by our lock.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, inputs: np.ndarray, labels: np.ndarray) -> int:
        """Store a batch of corrections at once (all or none); returns the record count."""
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        shape = ",".join(map(str, x.shape[1:]))
        rows = [
            (time.time(), int(label), shape, sample.tobytes())
            for sample, label in zip(x, labels, strict=True)
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (count,) = self._db.execute("SELECT COUNT(*) FROM feedback").fetchone()
                if count + len(rows) > self.max_records:
                    raise StoreFull(
                        f"the feedback store is full ({count} of {self.max_records} records): "
                        "run 'splitkd-edge adapt --feedback' or raise --feedback-max-records"
                    )
                self._db.executemany(
                    "INSERT INTO feedback (created, label, shape, inputs) VALUES (?, ?, ?, ?)", rows
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(count) + len(rows)

    def stats(self) -> FeedbackStats:
        with self._lock:
            per_label = dict(
                self._db.execute("SELECT label, COUNT(*) FROM feedback GROUP BY label").fetchall()
            )
            oldest, newest = self._db.execute(
                "SELECT MIN(created), MAX(created) FROM feedback"
            ).fetchone()
        return FeedbackStats(sum(per_label.values()), self.max_records, per_label, oldest, newest)

    def load(self, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Every record whose inputs have ``input_shape``, as arrays (x float32, y int64)."""
        wanted = ",".join(map(str, input_shape))
        with self._lock:
            rows = self._db.execute(
                "SELECT label, inputs FROM feedback WHERE shape = ? ORDER BY id", (wanted,)
            ).fetchall()
        x = np.zeros((len(rows), *input_shape), dtype=np.float32)
        y = np.zeros(len(rows), dtype=np.int64)
        for i, (label, blob) in enumerate(rows):
            x[i] = np.frombuffer(blob, dtype=np.float32).reshape(input_shape)
            y[i] = label
        return x, y
