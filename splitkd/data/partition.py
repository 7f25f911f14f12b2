"""Deterministic partitioning: the cloud's presumed part, edge shards, held-out splits.

Every function is a pure function of its arguments and a fixed seed, so the
cloud and each edge compute the same partition independently without
exchanging anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitkd.data.specs import DataError, Dataset

# The cloud's "presumed" data: a fixed part of a dataset reserved for the
# teacher when the cloud and the edges are handed the same file (the demo and
# the tests); edges never see it. Set 0 on an edge whose data is its own.
DEFAULT_PRESUMED_FRACTION = 0.4
DEFAULT_HELDOUT_FRACTION = 0.2
PARTITION_SEED = 20241217


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"i/n"`` with 0 <= i < n (edge i of n, counted from 0)."""
    try:
        left, right = text.split("/")
        index, count = int(left), int(right)
    except ValueError:
        raise DataError(f"shard {text!r} is not of the form I/N, e.g. 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise DataError(f"shard {text!r}: I must be in 0..N-1 (edges are counted from 0)")
    return Shard(index, count)


def presumed_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(cloud indices, device indices) of a dataset of ``n`` samples."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"presumed fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(PARTITION_SEED).permutation(n)
    cut = round(n * fraction)
    return np.sort(order[:cut]), np.sort(order[cut:])


def shard_indices(
    labels: np.ndarray, pool: np.ndarray, shard: Shard, alpha: float | None
) -> np.ndarray:
    """Shard ``shard`` of ``pool``: IID when ``alpha`` is None, else Dirichlet(alpha) per class."""
    rng = np.random.default_rng(PARTITION_SEED + 1)
    if alpha is None:
        parts = np.array_split(rng.permutation(pool), shard.count)
        return np.sort(parts[shard.index])
    if alpha <= 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == cls])
        weights = rng.dirichlet(np.full(shard.count, alpha))
        bounds = (np.cumsum(weights)[:-1] * len(members)).astype(int)
        chosen.append(np.split(members, bounds)[shard.index])
    return np.sort(np.concatenate(chosen))


def train_heldout(
    index: np.ndarray, fraction: float = DEFAULT_HELDOUT_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(PARTITION_SEED + 2).permutation(index)
    held = max(1, round(len(order) * fraction))
    return np.sort(order[held:]), np.sort(order[:held])


@dataclass(frozen=True)
class EdgeSplit:
    train: Dataset
    heldout: Dataset


def edge_split(
    dataset: Dataset,
    shard: Shard | None = None,
    *,
    alpha: float | None = None,
    presumed_fraction: float = DEFAULT_PRESUMED_FRACTION,
) -> EdgeSplit:
    """The train and held-out data of one edge."""
    _, pool = presumed_split(len(dataset), presumed_fraction)
    index = shard_indices(dataset.y, pool, shard or Shard(0, 1), alpha)
    if len(index) < 4:
        raise DataError(f"shard {shard} of {dataset.signature.name} has only {len(index)} samples")
    train, held = train_heldout(index)
    return EdgeSplit(dataset.subset(train), dataset.subset(held))


def cloud_split(
    dataset: Dataset, presumed_fraction: float = DEFAULT_PRESUMED_FRACTION
) -> EdgeSplit:
    """The cloud's presumed data, itself split into train and held-out for the teacher."""
    presumed, _ = presumed_split(len(dataset), presumed_fraction)
    if presumed_fraction == 0.0:
        presumed = np.arange(len(dataset))
    train, held = train_heldout(presumed)
    return EdgeSplit(dataset.subset(train), dataset.subset(held))
