"""How a cohort's round contributions become the next students: pluggable strategies.

In the spirit of Flower's ``Strategy``: the cohort hands a strategy the round's
contributions, the strategy returns the new students per device class (and
may update the server model). A cohort chooses its strategy by name in its
configuration; adding one is one class plus one line in ``STRATEGIES``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cloud_service.teacher import Teacher, TeacherVersions
from splitkd import koala
from splitkd.data.specs import Dataset
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel

log = logging.getLogger(__name__)
Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Contribution:
    """One device's round result: its whole student's weights, never data."""

    member_id: str
    device_class: str
    weights: Weights
    num_samples: int


@dataclass
class RoundOutcome:
    students: dict[str, Weights]
    server_model_version: int | None = None
    notes: dict[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    name: str

    def aggregate(
        self,
        round_number: int,
        students: dict[str, Weights],
        specs: dict[str, ModelSpec],
        contributions: list[Contribution],
    ) -> RoundOutcome: ...


class FedAvg:
    """Sample-weighted averaging within each device class; classes never mix."""

    name = "fedavg"

    def aggregate(
        self,
        round_number: int,
        students: dict[str, Weights],
        specs: dict[str, ModelSpec],
        contributions: list[Contribution],
    ) -> RoundOutcome:
        new = dict(students)
        for device_class in sorted({c.device_class for c in contributions}):
            mine = [
                (c.weights, c.num_samples) for c in contributions if c.device_class == device_class
            ]
            new[device_class] = koala.fedavg(mine)
        return RoundOutcome(new)


class Koala(FedAvg):
    """FedAvg per class, then small -> large (reverse KD) and large -> small (forward KD).

    Knowledge moves between device classes only through the server model. The
    server model gets a new version each round; sessions keep their own.
    """

    name = "koala"

    def __init__(
        self,
        teachers: TeacherVersions,
        proxy: np.ndarray,
        labels: koala.CloudLabels | None = None,
        settings: koala.TransferSettings | None = None,
        cohort: str = "",
    ) -> None:
        self.teachers = teachers
        self.cohort = cohort
        self.proxy = proxy
        self.labels = labels
        self.settings = settings or koala.TransferSettings()

    @property
    def anchor(self) -> Dataset | None:
        """The cloud's labelled training data both knowledge transfers also learn from."""
        return self.labels.train if self.labels else None

    def aggregate(
        self,
        round_number: int,
        students: dict[str, Weights],
        specs: dict[str, ModelSpec],
        contributions: list[Contribution],
    ) -> RoundOutcome:
        averaged = super().aggregate(round_number, students, specs, contributions)
        classes = sorted({c.device_class for c in contributions})
        models = {k: koala.model_from(specs[k], averaged.students[k]) for k in classes}
        seed = 1000 + round_number
        purpose = f"cohort {self.cohort} round {round_number}"
        # A round closed again (its cloud died after the server model learnt from it,
        # before the round was saved) takes that version: the server learns once a round.
        updated = self.teachers.made_for(purpose) if self.cohort else None
        if updated is None:
            server = self.teachers.current()
            # The server model is half of the ensemble it learns from: early rounds' weak
            # students cannot drag it far, a fleet that knows more moves it step by step.
            ensemble = [*models.values(), *[server.model] * len(models)]
            updated = self._learn(server, ensemble, seed, purpose)
        for device_class, model in models.items():
            koala.forward_kd(model, updated.model, self.proxy, self.settings, seed, self.anchor)
            averaged.students[device_class] = koala.weights_of(model)
        averaged.server_model_version = updated.version
        return averaged

    def _learn(
        self, server: Teacher, ensemble: list[StagedModel], seed: int, purpose: str
    ) -> Teacher:
        """Reverse KD; the new server model is published unless the cloud's held-out labels
        say it got worse (then the round teaches the students from the current one)."""
        learned = koala.reverse_kd(
            server.model, ensemble, self.proxy, self.settings, seed, self.anchor
        )
        if self.labels is not None and not koala.keeps(learned, server.model, self.labels.heldout):
            log.info(
                "%s: reverse KD scored lower on the cloud's held-out labels; server model v%d kept",
                purpose,
                server.version,
            )
            return server
        return self.teachers.update(learned, provenance={"made_for": purpose})


def strategy_for(
    name: str,
    teachers: TeacherVersions,
    proxy: np.ndarray | None,
    labels: koala.CloudLabels | None,
    cohort: str = "",
) -> Strategy:
    """The named strategy; ``koala`` needs the cloud's proxy inputs (``cohort``: whose)."""
    if name == "fedavg":
        return FedAvg()
    if name == "koala":
        if proxy is None or len(proxy) == 0:
            log.warning("no proxy inputs: the koala strategy falls back to plain FedAvg")
            return FedAvg()
        return Koala(teachers, proxy, labels, cohort=cohort)
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")


STRATEGIES = ("fedavg", "koala")
