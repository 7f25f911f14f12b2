"""The knowledge-distillation loss (Hinton et al.; torchdistill's formulation).

loss = alpha * tau^2 * KL(p_t || p_s) + (1 - alpha) * CE(z_s, y), with
p = softmax(z / tau), and optional class weights in the CE term. A language
model's logits ``[B, T, V]`` and labels ``[B, T]`` (or ``[B * T]``, as they
cross the wire) are taken per token (``per_token``): the same loss averaged
over every position instead of every sample. torchdistill writes the KL term as
``KLDivLoss(log_softmax(z_s / tau), softmax(z_t / tau))``; the tau^2 factor
keeps the gradient scale independent of the temperature.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from splitkd.kd_defaults import DEFAULT_ALPHA, DEFAULT_TEMPERATURE


class KDLoss(NamedTuple):
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    temperature: float = DEFAULT_TEMPERATURE,
    class_weights: torch.Tensor | None = None,
) -> KDLoss:
    """``class_weights`` (one per class) weight the CE term only, as a weighted mean
    (PyTorch's ``cross_entropy(weight=...)``); the teacher's soft targets stay as they are."""
    student_logits, teacher_logits = per_token(student_logits), per_token(teacher_logits)
    labels = labels.reshape(-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    kd = F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature * temperature
    ce = F.cross_entropy(student_logits, labels, weight=class_weights)
    return KDLoss(alpha * kd + (1.0 - alpha) * ce, kd, ce)


def per_token(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., V]`` as rows ``[N, V]``: a language model's tokens, a classifier's samples."""
    return logits.reshape(-1, logits.shape[-1]) if logits.dim() > 2 else logits
