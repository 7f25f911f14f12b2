"""The device's own data for one run: which samples train, which are held out, which
classes it holds, its class weights, and the counts the report gives."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from splitkd.classes import CLASS_WEIGHTINGS, balanced_weights
from splitkd.data import Dataset, EdgeSplit, edge_split, load_dataset
from splitkd.data.partition import default_presumed_fraction
from splitkd.data.specs import DataError
from splitkd.signature import DatasetSignature

if TYPE_CHECKING:
    from edge_agent.run import TrainOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalData:
    spec: str
    shard: str
    dataset: Dataset
    split: EdgeSplit
    presumed_fraction: float
    class_weighting: str

    @classmethod
    def load(cls, options: TrainOptions) -> LocalData:
        if options.class_weighting not in CLASS_WEIGHTINGS:
            raise DataError(
                f"class weighting must be one of {CLASS_WEIGHTINGS}, got {options.class_weighting!r}"
            )
        fraction = options.presumed_fraction
        if fraction is None:
            fraction = default_presumed_fraction(options.data)
        dataset = load_dataset(options.data)
        split = edge_split(
            dataset, options.shard, alpha=options.dirichlet_alpha, presumed_fraction=fraction
        )
        shard = str(options.shard) if options.shard else "0/1"
        local = cls(options.data, shard, dataset, split, fraction, options.class_weighting)
        counts = split.sample_counts()
        log.info(
            "%s: %d training and %d held-out samples, %d set aside for the cloud, %d in other "
            "shards; classes %s",
            options.device_id,
            counts["train"],
            counts["heldout"],
            counts["set_aside"],
            counts["other_shards"],
            local.classes_seen,
        )
        return local

    @property
    def labels(self) -> np.ndarray:
        """Every label this device uses: training and held-out."""
        return np.concatenate([self.split.train.y, self.split.heldout.y])

    @property
    def classes_seen(self) -> list[int]:
        return [int(c) for c in np.unique(self.labels)]

    @property
    def signature(self) -> DatasetSignature:
        """What Register says: the input shape and the class count of this device's labels
        (max + 1, at least 2), which the cloud checks against its teacher's classes. The
        cloud sees every training label in the steps anyway, so this reveals nothing more."""
        classes = max(2, int(self.labels.max()) + 1)
        return DatasetSignature(
            self.dataset.signature.input_shape, classes, self.dataset.signature.name
        )

    @property
    def class_weights(self) -> tuple[float, ...]:
        """Weights of the CE term per class (up to this device's largest label), or none."""
        if self.class_weighting == "none":
            return ()
        weights = balanced_weights(self.split.train.y, self.signature.num_classes)
        return tuple(float(w) for w in weights)

    def check_task(self, num_classes: int) -> None:
        """Refuse data with labels outside the task's classes (the teacher's)."""
        outside = [c for c in self.classes_seen if c >= num_classes]
        if outside:
            raise DataError(
                f"{self.spec}: labels {outside[:10]} are outside the task's {num_classes} classes "
                f"(0..{num_classes - 1}) that the cloud's teacher serves"
            )

    def report(self, num_classes: int) -> dict[str, Any]:
        """The report's "data" section; ``num_classes`` is the task's."""
        task = DatasetSignature(
            self.dataset.signature.input_shape, num_classes, self.dataset.signature.name
        )
        counts = self.split.sample_counts()
        return {
            "spec": self.spec,
            "shard": self.shard,
            "signature": task.describe(),
            "file_samples": len(self.dataset),
            "presumed_fraction": self.presumed_fraction,
            "train_samples": counts["train"],
            "heldout_samples": counts["heldout"],
            "set_aside_samples": counts["set_aside"],
            "other_shard_samples": counts["other_shards"],
            "classes_seen": self.classes_seen,
            "train_class_counts": {
                str(c): int(n)
                for c, n in enumerate(np.bincount(self.split.train.y.reshape(-1)))
                if n
            },
            "class_weighting": self.class_weighting,
            "class_weights": list(self.class_weights),
        }
