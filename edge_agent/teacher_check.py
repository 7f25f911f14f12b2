"""Is the cloud's teacher any good on this device's data? Measured before training.

A teacher trained on a small or different presumed set can be worse than the
student it teaches, and a KD loss weighted 0.9 then drags the student down. The
edge measures the teacher on its own held-out split through the split (teacher
head here, teacher tail in the cloud, labels never leave), warns when it is
weak, and with ``--kd-alpha auto`` weights the KD term by the teacher's quality:

    quality = clamp((accuracy - chance) / (1 - chance), 0, 1)
    alpha   = cloud_alpha * min(1, quality / TRUSTED_QUALITY)

``chance`` is the share of the held-out split's most frequent class (what
always guessing that class scores; 1/K on balanced data). A teacher at or above
``TRUSTED_QUALITY`` keeps the cloud's alpha; below it, alpha falls linearly to
0 at chance, where the loss becomes plain cross-entropy on the labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Four fifths of the way from chance to perfect: 0.82 on 10 balanced classes,
# 0.9 on two. Below that the teacher is weak on this data and the edge warns.
TRUSTED_QUALITY = 0.8
ALPHA_CHOICES = ("cloud", "auto")


@dataclass(frozen=True)
class TeacherCheck:
    device_accuracy: float  # the teacher on this device's held-out split
    cloud_accuracy: float | None  # as the cloud reported it at Register (its own held-out data)
    chance: float
    cloud_alpha: float
    alpha: float  # the KD weight this run trains with

    @property
    def quality(self) -> float:
        return teacher_quality(self.device_accuracy, self.chance)

    @property
    def weak(self) -> bool:
        return self.quality < TRUSTED_QUALITY


def chance_accuracy(labels: np.ndarray) -> float:
    labels = labels.reshape(-1)  # a language model's next tokens: one label per position
    if len(labels) == 0:
        return 0.0
    return float(np.bincount(labels).max() / len(labels))


def teacher_quality(accuracy: float, chance: float) -> float:
    if chance >= 1.0:  # one class only: nothing to tell apart
        return 1.0 if accuracy >= 1.0 else 0.0
    return float(np.clip((accuracy - chance) / (1.0 - chance), 0.0, 1.0))


def auto_alpha(cloud_alpha: float, accuracy: float, chance: float) -> float:
    return cloud_alpha * min(1.0, teacher_quality(accuracy, chance) / TRUSTED_QUALITY)


def check_teacher(
    device_accuracy: float,
    labels: np.ndarray,
    cloud_alpha: float,
    cloud_accuracy: float | None,
    mode: str = "cloud",
) -> TeacherCheck:
    """Decide the KD weight from the teacher's measured accuracy; warn once if it is weak."""
    chance = chance_accuracy(labels)
    alpha = auto_alpha(cloud_alpha, device_accuracy, chance) if mode == "auto" else cloud_alpha
    check = TeacherCheck(device_accuracy, cloud_accuracy, chance, cloud_alpha, alpha)
    if check.weak:
        reported = "unknown" if cloud_accuracy is None else f"{cloud_accuracy:.3f}"
        action = (
            f"KD weight lowered from {cloud_alpha:.2f} to {alpha:.2f}"
            if mode == "auto"
            else f"KD weight stays {cloud_alpha:.2f}; --kd-alpha auto would lower it"
        )
        log.warning(
            "the teacher is weak on this device's data: %.3f on %d held-out samples "
            "(chance %.3f, the cloud reports %s on its own); %s",
            device_accuracy,
            len(labels),
            chance,
            reported,
            action,
        )
    return check


def compare_with_student(check: TeacherCheck, student_accuracy: float) -> None:
    """After training: say so when the student beat the teacher that taught it."""
    if check.device_accuracy < student_accuracy:
        log.warning(
            "the teacher (%.3f) is less accurate than the student it taught (%.3f) on this "
            "device's held-out data; a better teacher or --kd-alpha auto may help",
            check.device_accuracy,
            student_accuracy,
        )


def report(check: TeacherCheck, student_accuracy: float) -> dict[str, float | bool | None]:
    return {
        "cloud_reported_accuracy": check.cloud_accuracy,
        "device_heldout_accuracy": check.device_accuracy,
        "student_accuracy": student_accuracy,
        "chance": check.chance,
        "weak": check.weak,
        "cloud_kd_alpha": check.cloud_alpha,
        "kd_alpha_used": check.alpha,
    }
