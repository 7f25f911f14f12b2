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
# teacher when the cloud and the edges are handed the same data set (the demo,
# the tests); edges never see it. A user's own file is used whole by default.
DEMO_PRESUMED_FRACTION = 0.4
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


def default_presumed_fraction(spec: str) -> float:
    """The share set aside for the cloud when none is asked for.

    The built-in ``digits`` (and ``pydoc-topics`` text) is handed to every cloud and every edge alike, so
    its split keeps the demo's convention; a file is the user's own, used whole.
    """
    return DEMO_PRESUMED_FRACTION if spec in ("digits", "pydoc-topics") else 0.0


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
    if labels.ndim > 1:
        raise DataError("non-IID shards are drawn per class; text has no classes (drop --alpha)")
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
    # The rest of the file, for reports: the other side's share (the cloud's
    # presumed part for an edge, the edges' part for the cloud), other shards.
    set_aside: int = 0
    other_shards: int = 0

    def sample_counts(self) -> dict[str, int]:
        """How many samples were used for what."""
        return {
            "train": len(self.train),
            "heldout": len(self.heldout),
            "set_aside": self.set_aside,
            "other_shards": self.other_shards,
        }


def edge_split(
    dataset: Dataset,
    shard: Shard | None = None,
    *,
    alpha: float | None = None,
    presumed_fraction: float,
) -> EdgeSplit:
    """The train and held-out data of one edge; ``presumed_fraction`` is kept for the cloud."""
    set_aside, pool = presumed_split(len(dataset), presumed_fraction)
    index = shard_indices(dataset.y, pool, shard or Shard(0, 1), alpha)
    if len(index) < 4:
        raise DataError(f"shard {shard} of {dataset.signature.name} has only {len(index)} samples")
    train, held = train_heldout(index)
    return EdgeSplit(
        dataset.subset(train), dataset.subset(held), len(set_aside), len(pool) - len(index)
    )


def cloud_split(dataset: Dataset, presumed_fraction: float) -> EdgeSplit:
    """The teacher's data, split into train and held-out: the presumed share, or all when 0."""
    presumed, edges = presumed_split(len(dataset), presumed_fraction)
    if presumed_fraction == 0.0:  # no edge shares this file: the teacher has all of it
        presumed, edges = edges, presumed
    train, held = train_heldout(presumed)
    return EdgeSplit(dataset.subset(train), dataset.subset(held), set_aside=len(edges))
