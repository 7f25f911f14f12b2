"""The DiReDi feedback loop's learning steps, with no network (seed 002).

1. ``distil_on_presumed``: the cloud distils a student from its teacher on its own
   presumed data (and, after an update, on the probe inputs too).
2. ``adapt``: the device fine-tunes the installed student on its exclusive data,
   anchored to the installed model's own outputs so it keeps what it knew.
3. ``probe_inputs``: the cloud's questions to the device: its presumed inputs
   under a fixed family of plausible deployment shifts (rotations, flips,
   inversion, offsets for images; noise and gain for other data). The device
   answers with the adapted model's logits on them; that answer is the whole
   knowledge report (docs/LIFECYCLE.md says why it reveals no raw input).
4. ``update_teacher``: reverse distillation: the teacher learns the adapted
   model's answers on the probes while cross entropy on the presumed data keeps
   its presumed knowledge; the caller's guardrail decides whether it is kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.models.normalize import fit_inputs
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel
from splitkd.training import accuracy_of, batch_order, make_optimizer, predict

M = TypeVar("M", bound=nn.Module)
TEMPERATURE = 2.0
# Image shifts a deployed camera or pen really meets: mounted sideways or upside
# down, mirrored optics, inverted polarity, a one-pixel offset.
IMAGE_SHIFTS = ("rot90", "rot180", "rot270", "flip_h", "flip_v", "invert", "offset")
VECTOR_SHIFTS = ("noise", "gain_up", "gain_down")


@dataclass(frozen=True)
class LoopSettings:
    """How hard each step works; the defaults run the demo's digits in seconds."""

    distil_epochs: int = 40
    adapt_epochs: int = 30
    teacher_epochs: int = 8
    learning_rate: float = 0.003
    teacher_learning_rate: float = 0.0005
    batch_size: int = 64
    probes_per_shift: int = 200
    within_quantile: float = 0.9
    seed: int = 0


def _shift_images(x: np.ndarray, shift: str) -> np.ndarray:
    if shift.startswith("rot"):
        return np.rot90(x, k=int(shift[3:]) // 90, axes=(-2, -1))
    if shift == "flip_h":
        return x[..., ::-1]
    if shift == "flip_v":
        return x[..., ::-1, :]
    if shift == "invert":
        return x.max() + x.min() - x
    if shift == "offset":
        return np.roll(x, 1, axis=-1)
    return x


def _shift_vectors(x: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
    spread = x.std(axis=0, keepdims=True) + 1e-6
    if shift == "noise":
        return x + rng.normal(0.0, 0.3, x.shape).astype(np.float32) * spread
    if shift == "gain_up":
        return x * 1.2
    if shift == "gain_down":
        return x * 0.8
    return x


def probe_inputs(presumed: np.ndarray, per_shift: int, seed: int) -> np.ndarray:
    """``per_shift`` presumed inputs under each shift of the family, stacked (float32)."""
    rng = np.random.default_rng(seed)
    image = presumed.ndim == 4
    shifts = IMAGE_SHIFTS if image else VECTOR_SHIFTS
    parts = []
    for shift in shifts:
        pick = rng.choice(len(presumed), size=min(per_shift, len(presumed)), replace=False)
        chosen = presumed[np.sort(pick)]
        shifted = _shift_images(chosen, shift) if image else _shift_vectors(chosen, shift, rng)
        parts.append(np.ascontiguousarray(shifted, dtype=np.float32))
    return np.concatenate(parts)


def soft_loss(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Hinton's soft-target term: tau^2 * KL(softmax(target / tau) || softmax(logits / tau))."""
    p = F.softmax(target_logits / TEMPERATURE, dim=1)
    log_q = F.log_softmax(logits / TEMPERATURE, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * TEMPERATURE**2


def _train(
    model: nn.Module,
    batches: int,
    loss_of: object,
    settings: LoopSettings,
    learning_rate: float,
    epochs: int,
) -> None:
    optimizer = make_optimizer(
        model.parameters(), Hyperparameters(learning_rate=learning_rate, batch_size=64)
    )
    for epoch in range(epochs):
        model.train()
        for index in batch_order(batches, settings.batch_size, settings.seed, epoch):
            loss = loss_of(torch.from_numpy(index))  # type: ignore[operator]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def distil_on_presumed(
    teacher: nn.Module,
    spec: ModelSpec,
    x: np.ndarray,
    y: np.ndarray,
    settings: LoopSettings,
    *,
    transfer: np.ndarray | None = None,
    start: StagedModel | None = None,
) -> StagedModel:
    """A student of ``spec`` taught by ``teacher`` on labelled presumed data ``x, y``.

    ``transfer``: extra unlabelled inputs (the probes) on which it follows the
    teacher alone; ``start``: a student to continue from (else a new one).
    """
    student = copy.deepcopy(start) if start is not None else zoo.build(spec, settings.seed)
    if start is None:
        fit_inputs(student, x)
    extra = transfer if transfer is not None else np.zeros((0, *x.shape[1:]), np.float32)
    inputs = torch.from_numpy(np.concatenate([x, extra]).astype(np.float32))
    with torch.no_grad():
        teacher.eval()
        soft = teacher(inputs)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    labelled = len(y)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        logits = student(inputs[index])
        known = index < labelled
        total = soft_loss(logits, soft[index])
        if bool(known.any()):
            total = total + F.cross_entropy(logits[known], labels[index[known]])
        return total

    _train(student, len(inputs), loss_of, settings, settings.learning_rate, settings.distil_epochs)
    return student


def adapt(installed: nn.Module, x: np.ndarray, y: np.ndarray, settings: LoopSettings) -> nn.Module:
    """The installed student fine-tuned on the device's exclusive ``x, y`` (a new object)."""
    model = copy.deepcopy(installed)
    inputs, labels = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs[index]), labels[index])

    _train(model, len(inputs), loss_of, settings, settings.learning_rate, settings.adapt_epochs)
    return model


def update_teacher(
    teacher: M,
    presumed_x: np.ndarray,
    presumed_y: np.ndarray,
    probes: np.ndarray,
    adapted_logits: np.ndarray,
    settings: LoopSettings,
) -> M:
    """A new teacher (a copy): the adapted model's answers on the probes, presumed labels kept."""
    model = copy.deepcopy(teacher)
    inputs = torch.from_numpy(np.concatenate([presumed_x, probes]).astype(np.float32))
    labels = torch.from_numpy(np.asarray(presumed_y, dtype=np.int64))
    targets = torch.from_numpy(probe_targets(teacher, presumed_x, probes, adapted_logits, settings))
    with torch.no_grad():
        teacher.eval()
        old = teacher(inputs[: len(presumed_y)])
    labelled = len(presumed_y)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        logits = model(inputs[index])
        known, probed = index < labelled, index >= labelled
        total = logits.sum() * 0.0
        if bool(known.any()):
            # Labels and its own soft answers (what it knew, dark knowledge included).
            mine = index[known]
            total = total + F.cross_entropy(logits[known], labels[mine])
            total = total + soft_loss(logits[known], old[mine])
        if bool(probed.any()):
            total = total + soft_loss(logits[probed], targets[index[probed] - labelled])
        return total

    _train(
        model,
        len(inputs),
        loss_of,
        settings,
        settings.teacher_learning_rate,
        settings.teacher_epochs,
    )
    return model


def probe_targets(
    teacher: nn.Module,
    presumed: np.ndarray,
    probes: np.ndarray,
    adapted_logits: np.ndarray,
    settings: LoopSettings,
) -> np.ndarray:
    """What the teacher learns on each probe: the device's answer, except on probes that
    lie within the presumed data (a mirrored 0 or 8 is still a presumed 0 or 8), where
    the teacher keeps its own."""
    inside = within(presumed, probes, settings.within_quantile)
    own = predict(teacher, probes.astype(np.float32))
    return np.where(inside[:, None], own, adapted_logits).astype(np.float32)


def within(presumed: np.ndarray, probes: np.ndarray, quantile: float) -> np.ndarray:
    """Per probe: is it as close to a presumed input as presumed inputs are to each other?"""
    data = presumed.reshape(len(presumed), -1).astype(np.float64)
    near = _nearest(data, data, exclude_self=True)
    limit = float(np.quantile(near, quantile))
    return _nearest(probes.reshape(len(probes), -1).astype(np.float64), data) <= limit


def _nearest(points: np.ndarray, data: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    squared = (points**2).sum(1)[:, None] + (data**2).sum(1)[None, :] - 2.0 * points @ data.T
    if exclude_self:
        np.fill_diagonal(squared, np.inf)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return accuracy_of(predict(model, x.astype(np.float32)), y) if len(y) else 0.0
