"""Per-class figures (recall, F1) and class weights for imbalanced device data.

numpy only: the edge computes these from onnxruntime's predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitkd.errors import InvalidArgument

CLASS_WEIGHTINGS = ("none", "balanced")
# Weights outside this range are refused on the wire: a weight of 1e30 makes
# the CE term overflow, one of 1e-30 makes a batch's weighted mean 0/0.
MIN_CLASS_WEIGHT = 1e-6
MAX_CLASS_WEIGHT = 1e6


def balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights n / (k * count_c) over the k classes present (scikit-learn's
    "balanced"); classes absent from ``labels`` get 1, which no sample's loss ever uses."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return np.clip(weights, MIN_CLASS_WEIGHT, MAX_CLASS_WEIGHT)


def check_class_weights(weights: Sequence[float], num_classes: int) -> tuple[float, ...]:
    """Empty (no weighting), or one finite weight in range per class; else InvalidArgument."""
    if not weights:
        return ()
    if len(weights) != num_classes:
        raise InvalidArgument(
            f"class_weights has {len(weights)} values, one per class expected ({num_classes})"
        )
    values = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(values).all() and (values >= MIN_CLASS_WEIGHT).all()):
        raise InvalidArgument(f"class weights must be finite and >= {MIN_CLASS_WEIGHT}")
    if (values > MAX_CLASS_WEIGHT).any():
        raise InvalidArgument(f"class weights must be <= {MAX_CLASS_WEIGHT:g}")
    return tuple(float(v) for v in values)


def padded_class_weights(weights: tuple[float, ...], num_classes: int) -> tuple[float, ...]:
    """A device's weights (one per class up to its largest label) over all the task's classes;
    a class beyond the device's labels gets 1, which none of its samples uses."""
    if not weights:
        return ()
    return weights + (1.0,) * (num_classes - len(weights))


@dataclass(frozen=True)
class ClassScores:
    """Figures over the classes present in the evaluated labels (macro = their plain mean)."""

    accuracy: float
    macro_recall: float
    macro_f1: float
    recall: dict[int, float]  # per class present in the labels
    support: dict[int, int]

    def as_report(self) -> dict[str, object]:
        return {
            "accuracy": self.accuracy,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "per_class_recall": {str(c): r for c, r in self.recall.items()},
            "per_class_support": {str(c): n for c, n in self.support.items()},
        }


def class_scores(predicted: np.ndarray, labels: np.ndarray) -> ClassScores:
    """Accuracy, per-class recall, macro recall and macro F1 of ``predicted`` against ``labels``.

    A class with no held-out sample has no recall and stays out of the macro
    figures; a class never predicted has precision 0 (its F1 is then 0).
    """
    if len(labels) == 0:
        raise InvalidArgument("no labels to score against")
    recall: dict[int, float] = {}
    support: dict[int, int] = {}
    f1: list[float] = []
    for cls in np.unique(labels).tolist():
        actual, guessed = labels == cls, predicted == cls
        hits = int((actual & guessed).sum())
        support[cls] = int(actual.sum())
        recall[cls] = hits / support[cls]
        precision = hits / int(guessed.sum()) if guessed.any() else 0.0
        both = precision + recall[cls]
        f1.append(2 * precision * recall[cls] / both if both else 0.0)
    return ClassScores(
        accuracy=float((predicted == labels).mean()),
        macro_recall=float(np.mean(list(recall.values()))),
        macro_f1=float(np.mean(f1)),
        recall=recall,
        support=support,
    )
