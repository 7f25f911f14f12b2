"""Load a dataset from a spec string: ``digits``, ``npz:PATH``, ``csv:PATH``,
``text:PATH`` or ``pydoc-topics`` (text: splitkd/data/text.py).

Files a user hands us are read as plain arrays (``splitkd.data.files``), never
pickle, and validated here: every problem is one ``DataError`` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitkd.data import text
from splitkd.data.files import DataError, RawData, read_csv, read_npz
from splitkd.signature import MAX_CLASSES, DatasetSignature

__all__ = ["DataError", "Dataset", "load_dataset"]


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32 [N, ...]
    y: np.ndarray  # int64 [N] (text: [N, T], the next token at each position)
    signature: DatasetSignature

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.x[index], self.y[index], self.signature)


def _digits() -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 grey images with values 0..16: scale to [0, 1], keep the image layout.
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return RawData(x, bunch.target.astype(np.int64), "digits", "digits", lambda i: f"sample {i}")


def load_dataset(spec: str) -> Dataset:
    """Parse ``spec`` and load the whole dataset, validated."""
    kind, _, rest = spec.partition(":")
    if spec == text.BUILTIN or (kind == "text" and rest):
        x, y, signature = text.load_text(spec)
        return Dataset(x, y, signature)
    if kind == "digits" and not rest:
        raw = _digits()
    elif kind in ("npz", "csv") and rest:
        path = Path(rest).expanduser()
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        raw = read_npz(path) if kind == "npz" else read_csv(path)
    else:
        raise DataError(
            f"unknown data spec {spec!r}: use 'digits', 'npz:PATH', 'csv:PATH', 'text:PATH' "
            f"or '{text.BUILTIN}'"
        )
    return _validated(raw)


def _validated(raw: RawData) -> Dataset:
    x, y, name = np.asarray(raw.x), np.asarray(raw.y), raw.source
    if x.ndim < 2 or x.ndim > 4:
        raise DataError(
            f"{name}: x must be [N, F], [N, C, L] or [N, C, H, W], got shape {list(x.shape)}"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"{name}: y must be a vector with one label per row of x ({len(x)}), got {list(y.shape)}"
        )
    if len(y) < 10:
        raise DataError(f"{name}: {len(y)} samples are too few to train and evaluate")
    if x.dtype.kind not in "fiub" or y.dtype.kind not in "fiu":
        raise DataError(f"{name}: x and y must be numeric (got {x.dtype}, {y.dtype})")
    labels = _labels(y, raw)
    features = _features(x, raw)
    # The class count comes from the whole file, not a shard, so that every edge
    # of one dataset presents the same signature even if its shard lacks a class.
    # At least 2: a device whose labels are all 0 still holds part of a task's data.
    classes = max(2, int(labels.max()) + 1)
    signature = DatasetSignature(tuple(int(d) for d in x.shape[1:]), classes, raw.name)
    return Dataset(features, labels, signature)


def _labels(y: np.ndarray, raw: RawData) -> np.ndarray:
    """Class numbers 0..MAX_CLASSES-1, checked before any cast could wrap them around."""
    # Comparisons only, no arithmetic: NaN and Inf fail them without numpy warnings.
    whole = np.floor(y) == y if y.dtype.kind == "f" else np.ones(len(y), dtype=bool)
    good = whole & (y >= 0) & (y < MAX_CLASSES)
    if not good.all():
        i = int(np.argmin(good))
        value = y[i].item()
        raise DataError(
            f"{raw.source}: label {value!r} at {raw.where(i)} is not a class number: labels are "
            f"whole numbers from 0 to {MAX_CLASSES - 1}"
        )
    return y.astype(np.int64)


def _features(x: np.ndarray, raw: RawData) -> np.ndarray:
    """float32 features; NaN, Inf and values float32 cannot hold are refused by position."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is found just below
        features = x.astype(np.float32)
        finite = np.isfinite(features.reshape(len(features), -1)).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise DataError(
            f"{raw.source}: x at {raw.where(i)} has NaN, Inf or a value beyond float32's "
            f"range (±{float(np.finfo(np.float32).max):.3g})"
        )
    return features
