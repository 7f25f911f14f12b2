"""Knowledge transfer between a cohort's small students and the server model (KOALA).

- ``local_train``: what a device does in a federated round (its whole student,
  cross entropy on its own data, a few epochs).
- ``fedavg``: the sample-weighted average of a device class's students.
- ``reverse_kd`` (small -> large): the server model learns from the ensemble of
  the classes' students on the cloud's unlabelled proxy inputs.
- ``forward_kd`` (large -> small): each class's student learns from the server
  model on the same proxy inputs.
No raw device data is involved anywhere here: devices contribute weights only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from splitkd.data.specs import Dataset
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.models.normalize import fit_inputs, input_stage
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel
from splitkd.training import batch_order, make_optimizer

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class TransferSettings:
    """How hard the cloud pushes knowledge each round (epochs over the proxy inputs)."""

    reverse_epochs: int = 2
    # The server model is the cohort's best knowledge: the students follow it closely
    # (5 epochs; 2 left a non-IID fleet's students 3 points short of centralised KD).
    forward_epochs: int = 5
    temperature: float = 3.0
    learning_rate: float = 0.001
    batch_size: int = 64
    # Reverse KD keeps the server model close to its labelled presumed data
    # (when the cloud has any): weight of that cross-entropy anchor.
    anchor_weight: float = 0.5


@dataclass(frozen=True)
class CloudLabels:
    """The cloud's own labelled data (never a device's), when it has any.

    ``train`` anchors the server model's reverse KD; ``heldout`` decides whether the
    server model that reverse KD made is kept. Without that check a strong server model
    drifts towards the fleet's weaker students round after round (20 rounds took a 0.972
    teacher to 0.94 on the devices' data in simulation, and the Pi Zero cohort with it).
    """

    train: Dataset
    heldout: Dataset

    @classmethod
    def split(cls, data: Dataset, heldout_share: float = 0.2) -> CloudLabels:
        """Every fifth sample held out: deterministic, and each class keeps its share."""
        stride = max(2, round(1 / heldout_share))
        held = np.zeros(len(data), dtype=bool)
        held[::stride] = True
        return cls(data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held)))


def keeps(candidate: StagedModel, current: StagedModel, heldout: Dataset) -> bool:
    """Whether the server model reverse KD made is at least as accurate as the current one
    on the cloud's held-out labels."""
    from splitkd.training import accuracy_of, predict

    def score(model: StagedModel) -> float:
        return accuracy_of(predict(model, heldout.x), heldout.y)

    return score(candidate) >= score(current)


def model_from(spec: ModelSpec, weights: Weights) -> StagedModel:
    model = zoo.build(spec)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model


def weights_of(model: StagedModel) -> Weights:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def local_train(
    spec: ModelSpec, weights: Weights, data: Dataset, hyper: Hyperparameters, epochs: int, seed: int
) -> tuple[Weights, float]:
    """A device's federated round: CE on its own data from the round's weights.

    A student that has no input statistics yet (the cohort's first round) takes
    the device's own; FedAvg then averages them like every other tensor.
    """
    model = model_from(spec, weights)
    stage = input_stage(model)
    if stage is not None and not stage.input_mean.any() and bool((stage.input_std == 1).all()):
        fit_inputs(model, data.x)
    optimizer = make_optimizer(model.parameters(), hyper)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    model.train()
    loss = torch.zeros(())
    for epoch in range(epochs):
        for index in batch_order(len(data), hyper.batch_size, seed, epoch):
            ix = torch.from_numpy(index)
            loss = F.cross_entropy(model(x[ix]), y[ix])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return weights_of(model), float(loss.detach())


def fedavg(contributions: Sequence[tuple[Weights, int]]) -> Weights:
    """Sample-weighted mean of the contributions' tensors (all of one architecture)."""
    total = float(sum(count for _, count in contributions))
    names = contributions[0][0].keys()
    return {
        name: sum(
            (w[name].astype(np.float64) * (count / total) for w, count in contributions),
            start=np.zeros_like(contributions[0][0][name], dtype=np.float64),
        ).astype(np.float32)
        for name in names
    }


@torch.no_grad()
def _soft(models: Sequence[StagedModel], x: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ensemble's softened class probabilities (mean over models)."""
    probs = [F.softmax(m.eval()(x) / temperature, dim=1) for m in models]
    return torch.stack(probs).mean(dim=0)


def _distil(
    learner: StagedModel,
    teachers: Sequence[StagedModel],
    proxy: np.ndarray,
    settings: TransferSettings,
    epochs: int,
    seed: int,
    anchor: Dataset | None = None,
) -> None:
    """Train ``learner`` towards the teachers' soft outputs on ``proxy`` (in place)."""
    x = torch.from_numpy(proxy)
    tau = settings.temperature
    targets = _soft(teachers, x, tau)
    optimizer = torch.optim.Adam(learner.parameters(), lr=settings.learning_rate)
    learner.train()
    for epoch in range(epochs):
        anchor_order = (
            list(batch_order(len(anchor), settings.batch_size, seed + 1, epoch)) if anchor else []
        )
        for i, index in enumerate(batch_order(len(proxy), settings.batch_size, seed, epoch)):
            ix = torch.from_numpy(index)
            log_p = F.log_softmax(learner(x[ix]) / tau, dim=1)
            loss = F.kl_div(log_p, targets[ix], reduction="batchmean") * tau * tau
            if anchor is not None and anchor_order:
                ax = torch.from_numpy(anchor_order[i % len(anchor_order)])
                ce = F.cross_entropy(
                    learner(torch.from_numpy(anchor.x)[ax]), torch.from_numpy(anchor.y)[ax]
                )
                loss = loss + settings.anchor_weight * ce
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    learner.eval()


def reverse_kd(
    server: StagedModel,
    students: Sequence[StagedModel],
    proxy: np.ndarray,
    settings: TransferSettings,
    seed: int,
    anchor: Dataset | None = None,
) -> StagedModel:
    """Small -> large: a NEW server model trained towards the students' ensemble.

    The given ``server`` is never modified: sessions may still be using it.
    """
    learner = copy.deepcopy(server)
    _distil(learner, students, proxy, settings, settings.reverse_epochs, seed, anchor)
    return learner


def forward_kd(
    student: StagedModel,
    server: StagedModel,
    proxy: np.ndarray,
    settings: TransferSettings,
    seed: int,
    anchor: Dataset | None = None,
) -> StagedModel:
    """Large -> small: the class's student trained towards the server model (in place),
    and towards the cloud's own labels when it has some (``anchor``)."""
    _distil(student, [server], proxy, settings, settings.forward_epochs, seed, anchor)
    return student
