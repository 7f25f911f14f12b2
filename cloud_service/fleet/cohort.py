"""A cohort's rounds as a small state machine (no network, no threads of its own).

Round 1 opens when ``min_devices`` devices joined. A round closes when every
live member delivered, or at its deadline with whoever delivered (a straggler
never stalls the fleet). A member that missed a round no longer holds the
next one up; it rejoins the count as soon as it delivers again. Callers hold
``cohort.lock`` around every method.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from cloud_service.fleet.strategy import Contribution, RoundOutcome
from splitkd.errors import FailedPrecondition
from splitkd.messages import NEXT_ROUND, CohortConfig, RoundState, SessionAsk
from splitkd.models.spec import ModelSpec

Weights = dict[str, np.ndarray]
# Devices that have nothing to do ask again after this long (bounded polling).
RETRY_AFTER_SECONDS = 0.5


@dataclass
class Member:
    member_id: str
    device_id: str
    device_class: str
    num_samples: int
    missed: int = 0  # consecutive rounds closed without this member's update
    # What the member asked of its round sessions (split cohorts, fleet/wire.py), as
    # flat fields so that checkpoints keep them; empty / 0: the cohort's settings.
    wire_codec: str = ""
    student_cut: int = 0
    train_samples: int = 0  # > 0: a teacher-output cache kept across its rounds
    # How its weights travel in federated rounds (fleet/weights.py), settled at its join.
    weights_codec: str = "float32"

    @property
    def ask(self) -> SessionAsk:
        return SessionAsk(self.wire_codec, self.train_samples, self.student_cut)

    def asks(self, ask: SessionAsk) -> None:
        self.wire_codec, self.student_cut = ask.wire_codec, ask.student_cut
        self.train_samples = ask.train_samples


@dataclass
class RoundRecord:
    round: int
    devices: int
    accuracy: (
        float  # sample-weighted held-out accuracy the devices reported for the round's start model
    )
    seconds: float
    server_model_version: int
    published: dict[str, int] = field(default_factory=dict)  # device class -> model version

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Pending:
    contribution: Contribution
    accuracy: float


class Cohort:
    def __init__(
        self,
        name: str,
        config: CohortConfig,
        specs: dict[str, ModelSpec],
        students: dict[str, Weights],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.specs = specs
        self.students = students
        self.clock = clock
        self.lock = threading.Lock()
        self.members: dict[str, Member] = {}
        self.round = 0  # the open round; 0 until it starts
        self.complete = False
        self.aggregating = False
        self.opened_at = 0.0
        self.deadline = 0.0
        self.pending: dict[str, Pending] = {}
        self.history: list[RoundRecord] = []
        self.server_model_version = 0
        self.published: dict[str, int] = {}  # device class -> latest version

    # -- membership ---------------------------------------------------------
    def join(
        self, device_id: str, device_class: str, num_samples: int, ask: SessionAsk | None = None
    ) -> Member:
        """Join (or rejoin: a device keeps its member id); opens round 1 when enough joined.

        ``ask``: the wire the device wants for its round sessions (a rejoin may change it).
        """
        for member in self.members.values():
            if member.device_id == device_id:
                if member.device_class != device_class:
                    raise FailedPrecondition(
                        f"device {device_id} joined cohort {self.name} as class "
                        f"{member.device_class}, not {device_class}"
                    )
                member.num_samples, member.missed = num_samples, 0
                member.asks(ask or SessionAsk())
                return member
        member = Member(secrets.token_hex(16), device_id, device_class, num_samples)
        member.asks(ask or SessionAsk())
        self.members[member.member_id] = member
        if self.round == 0 and len(self.members) >= self.config.min_devices:
            self._open(1)
        return member

    def member(self, member_id: str) -> Member:
        if member_id not in self.members:
            raise FailedPrecondition(f"not a member of cohort {self.name}; join it again")
        return self.members[member_id]

    # -- rounds ---------------------------------------------------------------
    def _open(self, number: int) -> None:
        self.round = number
        self.pending = {}
        self.opened_at = self.clock()
        self.deadline = self.opened_at + self.config.round_timeout_seconds

    def task_state(self, member: Member, after_round: int) -> RoundState:
        """What ``member`` should do now, having completed ``after_round``."""
        if self.complete:
            return RoundState.COMPLETE
        if (
            self.round == 0
            or self.aggregating
            or member.member_id in self.pending
            or after_round >= self.round
        ):
            return RoundState.WAITING
        return RoundState.TRAINING

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def accept(self, member: Member, round_number: int, pending: Pending) -> bool:
        """Take a round's update; False when this member's update was already taken."""
        if self.complete:
            raise FailedPrecondition(f"cohort {self.name} is complete; download its student")
        if round_number != self.round or self.aggregating:
            raise FailedPrecondition(
                f"round {round_number} of cohort {self.name} is closed (the open round is "
                f"{self.round}{', closing' if self.aggregating else ''}); {NEXT_ROUND}"
            )
        if member.member_id in self.pending:
            return False
        self.pending[member.member_id] = pending
        member.missed = 0
        return True

    def ready_to_close(self) -> bool:
        if self.round == 0 or self.complete or self.aggregating:
            return False
        live = [m for m in self.members.values() if m.missed == 0]
        if live and all(m.member_id in self.pending for m in live):
            return True
        if self.clock() < self.deadline:
            return False
        if not self.pending:
            # Nobody delivered: give the round another period instead of closing it empty.
            self.deadline = self.clock() + self.config.round_timeout_seconds
            for m in self.members.values():
                m.missed += 1
            return False
        return True

    def begin_close(self) -> list[Pending]:
        self.aggregating = True
        return list(self.pending.values())

    def end_close(
        self, outcome: RoundOutcome | None, published: dict[str, int], pending: list[Pending]
    ) -> RoundRecord | None:
        """Apply the outcome (None: aggregation failed, the round stays open)."""
        self.aggregating = False
        if outcome is None:
            return None
        self.students = outcome.students
        if outcome.server_model_version is not None:
            self.server_model_version = outcome.server_model_version
        self.published.update(published)
        total = sum(p.contribution.num_samples for p in pending)
        record = RoundRecord(
            round=self.round,
            devices=len(pending),
            accuracy=sum(p.accuracy * p.contribution.num_samples for p in pending) / total,
            seconds=self.clock() - self.opened_at,
            server_model_version=self.server_model_version,
            published=dict(published),
        )
        self.history.append(record)
        for m in self.members.values():
            if m.member_id not in self.pending:
                m.missed += 1
        if self.round >= self.config.rounds:
            self.complete = True
            self.pending = {}
        else:
            self._open(self.round + 1)
        return record

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "mode": self.config.mode,
            "config": asdict(self.config),
            "round": self.round,
            "complete": self.complete,
            "devices": len(self.members),
            "live_devices": sum(1 for m in self.members.values() if m.missed == 0),
            "classes": sorted({m.device_class for m in self.members.values()}),
            "server_model_version": self.server_model_version,
            "published": dict(self.published),
            "rounds": [r.to_dict() for r in self.history],
        }

    def member_list(self) -> list[dict[str, object]]:
        """Members as an operator sees them (device ids and classes, never member secrets)."""
        return [
            {
                "device_id": m.device_id,
                "device_class": m.device_class,
                "missed_rounds": m.missed,
                "samples": m.num_samples,
                # What it asked of its round sessions ("" / 0: the cohort's settings).
                "asks": {
                    "wire_codec": m.wire_codec,
                    "student_cut": m.student_cut,
                    "teacher_cache": m.train_samples > 0,
                    "weights_codec": m.weights_codec,
                },
            }
            for m in self.members.values()
        ]
