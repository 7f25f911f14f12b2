"""Load a dataset from a spec string: ``digits``, ``npz:PATH`` or ``csv:PATH``.

Files a user hands us are read as plain arrays: ``np.load(allow_pickle=False)``
and a numeric CSV parser, never pickle.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitkd.errors import InvalidArgument
from splitkd.signature import DatasetSignature


class DataError(InvalidArgument):
    """A dataset spec or file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32 [N, ...]
    y: np.ndarray  # int64 [N]
    signature: DatasetSignature

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.x[index], self.y[index], self.signature)


def _digits() -> tuple[np.ndarray, np.ndarray, str]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 grey images with values 0..16: scale to [0, 1], keep the image layout.
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return x, bunch.target.astype(np.int64), "digits"


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise DataError(
                    f"{path}: an npz dataset needs arrays 'x' and 'y', found {sorted(archive.files)}"
                )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from exc
    return x, y, path.stem


def _csv(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    rows: list[list[float]] = []
    try:
        with path.open(newline="") as handle:
            for line_no, row in enumerate(csv.reader(handle), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                try:
                    rows.append([float(c) for c in row])
                except ValueError:
                    if line_no == 1 and not rows:
                        continue  # a header row
                    raise DataError(f"{path}:{line_no}: non-numeric value in {row[:6]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: no data rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1 or widths.pop() < 2:
        raise DataError(f"{path}: every row needs the same number of columns (>= 2, label last)")
    table = np.asarray(rows, dtype=np.float64)
    return table[:, :-1], table[:, -1], path.stem


def load_dataset(spec: str) -> Dataset:
    """Parse ``spec`` and load the whole dataset, validated."""
    kind, _, rest = spec.partition(":")
    if kind == "digits" and not rest:
        x, y, name = _digits()
    elif kind in ("npz", "csv") and rest:
        path = Path(rest).expanduser()
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        x, y, name = _npz(path) if kind == "npz" else _csv(path)
    else:
        raise DataError(f"unknown data spec {spec!r}: use 'digits', 'npz:PATH' or 'csv:PATH'")
    return _validated(np.asarray(x), np.asarray(y), name)


def _validated(x: np.ndarray, y: np.ndarray, name: str) -> Dataset:
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
    if y.dtype.kind == "f" and not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"{name}: labels must be integers")
    labels = y.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{name}: labels must be 0..K-1, found {labels.min()}")
    features = x.astype(np.float32)
    if not np.isfinite(features).all():
        raise DataError(f"{name}: x contains NaN or Inf")
    # The class count comes from the whole file, not a shard, so that every edge
    # of one dataset presents the same signature even if its shard lacks a class.
    signature = DatasetSignature(tuple(int(d) for d in x.shape[1:]), int(labels.max()) + 1, name)
    return Dataset(features, labels, signature)
