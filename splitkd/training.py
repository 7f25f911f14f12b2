"""Single-process training: the teacher, the no-teacher baseline, centralised KD.

The centralised KD loop is the reference the split protocol must reproduce
exactly (same batches, same optimizer steps), so the batch order and the
optimizer factory here are the ones the edge and the cloud use too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitkd.data.specs import Dataset
from splitkd.hyper import Hyperparameters
from splitkd.kd import kd_loss, per_token
from splitkd.models import zoo
from splitkd.models.normalize import fit_inputs
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel


def make_optimizer(params: Iterable[nn.Parameter], hyper: Hyperparameters) -> torch.optim.Optimizer:
    if hyper.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hyper.learning_rate, momentum=0.9)
    return torch.optim.Adam(params, lr=hyper.learning_rate)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """The sample indices of each batch of one epoch (shuffled, deterministic)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def weight_tensor(class_weights: Sequence[float]) -> torch.Tensor | None:
    """Class weights as the CE term takes them (float32, as on the wire); None for none."""
    return torch.tensor(class_weights, dtype=torch.float32) if class_weights else None


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = [
        model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


def accuracy_of(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples (of tokens, for a language model) whose top logit is the label."""
    rows = logits.reshape(labels.size, -1)
    return float((rows.argmax(axis=1) == labels.reshape(-1)).mean())


def train_supervised(
    spec: ModelSpec,
    data: Dataset,
    hyper: Hyperparameters,
    progress: Callable[[int, float], None] | None = None,
    class_weights: Sequence[float] = (),
) -> StagedModel:
    """Plain cross-entropy training: the teacher, and the student without a teacher."""
    weight = weight_tensor(class_weights)
    model = zoo.build(spec, hyper.seed)
    fit_inputs(model, data.x)
    optimizer = make_optimizer(model.parameters(), hyper)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    step = 0
    for epoch in range(hyper.epochs):
        model.train()
        for index in batch_order(len(data), hyper.batch_size, hyper.seed, epoch):
            ix = torch.from_numpy(index)
            loss = F.cross_entropy(per_token(model(x[ix])), y[ix].reshape(-1), weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if progress is not None:
                progress(step, float(loss.detach()))
    model.eval()
    return model


@dataclass
class KDRun:
    student: StagedModel
    losses: list[float] = field(default_factory=list)


def train_kd_centralised(
    student_spec: ModelSpec,
    teacher: StagedModel,
    data: Dataset,
    hyper: Hyperparameters,
    class_weights: Sequence[float] = (),
) -> KDRun:
    """KD in one process: the reference for the split run (same seed, same batches)."""
    weight = weight_tensor(class_weights)
    student = zoo.build(student_spec, hyper.seed)
    fit_inputs(student, data.x)  # as the edge does on its training split
    optimizer = make_optimizer(student.parameters(), hyper)
    teacher.eval()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    run = KDRun(student)
    for epoch in range(hyper.epochs):
        student.train()
        for index in batch_order(len(data), hyper.batch_size, hyper.seed, epoch):
            ix = torch.from_numpy(index)
            with torch.no_grad():
                teacher_logits = teacher(x[ix])
            loss = kd_loss(
                student(x[ix]), teacher_logits, y[ix], hyper.kd_alpha, hyper.kd_temperature, weight
            )
            optimizer.zero_grad()
            loss.total.backward()
            optimizer.step()
            run.losses.append(float(loss.total.detach()))
    student.eval()
    return run
