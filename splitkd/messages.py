"""Typed messages shared by the cloud and the edge (mapped to protobuf in ``splitkd.serde``).

Both sides speak these dataclasses; only ``serde`` knows the protobuf classes,
so a field is added in three places: the ``.proto``, here, and ``serde``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from splitkd.codecs import CODECS, Encoded
from splitkd.errors import InvalidArgument
from splitkd.hyper import Hyperparameters
from splitkd.models.spec import ModelSpec
from splitkd.weights_codec import DEFAULT_WEIGHTS_CODEC, WEIGHTS_CODECS

COHORT_MODES = ("federated", "split")
# How the cloud ends its answer to an update for a round that closed without it: a
# straggler that reads it goes on with the next round instead of giving up.
NEXT_ROUND = "fetch the next round"
Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class SessionInfo:
    """A split session as both sides know it: Register's and Resume's answer."""

    session_id: str
    student_spec: ModelSpec
    teacher_spec: ModelSpec
    student_cut: int
    teacher_cut: int
    student_head: Weights
    teacher_head: Weights
    hyper: Hyperparameters
    next_step: int
    model_name: str
    teacher_accuracy: float | None = None  # on the cloud's held-out data; None: unknown
    # Samples whose teacher outputs the cloud caches for this session (0: no cache).
    teacher_cache_samples: int = 0


@dataclass(frozen=True)
class TaskDescription:
    """What the cloud would train for a data signature (Describe's answer, for the planner)."""

    student_spec: ModelSpec
    teacher_spec: ModelSpec
    student_cuts: tuple[int, ...]
    teacher_cuts: tuple[int, ...]
    default_student_cut: int
    default_teacher_cut: int
    hyper: Hyperparameters
    wire_codecs: tuple[str, ...]
    teacher_cache_samples: int


@dataclass(frozen=True)
class SessionAsk:
    """What an edge may ask of a new session beyond its data signature (RegisterRequest)."""

    wire_codec: str = ""  # empty: the cloud's default
    train_samples: int = 0  # with it the cloud may grant a teacher-output cache
    student_cut: int = 0  # 0: the cloud's choice
    teacher_cut: int = 0
    pipeline_depth: int = 1  # steps the edge keeps in flight (cloud_service/pipeline.py)


@dataclass(frozen=True)
class StepOutcome:
    """The cloud's half of one split step, as the cloud computes it and the edge receives it."""

    step: int
    gradient: np.ndarray  # dLoss/d(student activations), the activations' shape
    loss: float
    kd_loss: float
    ce_loss: float
    correct: int
    replayed: bool = False
    next_teacher_accepted: bool = False
    # On the cloud: the gradient as the session's codec packed it (``gradient`` is
    # then what the edge decodes from it, so an in-process run sees the same).
    encoded: Encoded | None = None


@dataclass(frozen=True)
class CohortConfig:
    """How a cohort trains: the cloud's ``serve`` flags, overridden per cohort by a TOML file."""

    mode: str = "federated"
    min_devices: int = 1
    rounds: int = 10
    local_epochs: int = 3
    round_timeout_seconds: float = 300.0
    # The frugal wire of split cohorts (cloud_service/fleet/wire.py): the round sessions'
    # codec and student cut when a member asks none ("" / 0: the cloud's --wire-codec /
    # --student-cut), and the codecs a member may ask (empty: any).
    wire_codec: str = ""
    wire_codecs: tuple[str, ...] = ()
    student_cut: int = 0
    # The frugal wire of federated cohorts (splitkd/weights_codec.py): how the weights
    # travel when a member asks nothing, and the codecs a member may ask (empty: any).
    weights_codec: str = DEFAULT_WEIGHTS_CODEC
    weights_codecs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A checkpoint's JSON gives a list: keep the config hashable and immutable.
        object.__setattr__(self, "wire_codecs", tuple(self.wire_codecs))
        object.__setattr__(self, "weights_codecs", tuple(self.weights_codecs))
        self._check_wire()
        self._check_weights_wire()
        if self.mode not in COHORT_MODES:
            raise InvalidArgument(f"cohort mode must be one of {COHORT_MODES}, got {self.mode!r}")
        if not 1 <= self.min_devices <= 100_000:
            raise InvalidArgument(f"min devices must be in 1..100000, got {self.min_devices}")
        if not 1 <= self.rounds <= 10_000:
            raise InvalidArgument(f"rounds must be in 1..10000, got {self.rounds}")
        if not 1 <= self.local_epochs <= 1_000:
            raise InvalidArgument(f"local epochs must be in 1..1000, got {self.local_epochs}")
        if not 0.1 <= self.round_timeout_seconds <= 86_400:
            raise InvalidArgument(
                f"round timeout must be in 0.1..86400 s, got {self.round_timeout_seconds}"
            )

    def _check_wire(self) -> None:
        named = [self.wire_codec] if self.wire_codec else []
        for name in [*named, *self.wire_codecs]:
            if name not in CODECS:
                raise InvalidArgument(
                    f"unknown wire codec {name!r}; use one of {', '.join(CODECS)}"
                )
        if self.wire_codecs and self.wire_codec not in self.wire_codecs:
            raise InvalidArgument(
                f"the cohort's wire codec {self.wire_codec or 'default'!r} is not among the "
                f"codecs it allows {list(self.wire_codecs)}"
            )
        if not 0 <= self.student_cut <= 64:
            raise InvalidArgument(f"student cut must be in 0..64, got {self.student_cut}")

    def _check_weights_wire(self) -> None:
        for name in [self.weights_codec, *self.weights_codecs]:
            if name not in WEIGHTS_CODECS:
                raise InvalidArgument(
                    f"unknown weights codec {name!r}; use one of {', '.join(WEIGHTS_CODECS)}"
                )
        if self.weights_codecs and self.weights_codec not in self.weights_codecs:
            raise InvalidArgument(
                f"the cohort's weights codec {self.weights_codec!r} is not among the codecs "
                f"it allows {list(self.weights_codecs)}"
            )


@dataclass(frozen=True)
class JoinAnswer:
    """What a device learns when it joins a cohort."""

    member_id: str
    cohort: str
    device_class: str
    config: CohortConfig
    student_spec: ModelSpec
    hyper: Hyperparameters
    model_name: str
    round: int
    server_model_version: int
    weights_codec: str = "float32"  # fedwire: how this member's weights travel


class RoundState(Enum):
    WAITING = "waiting"
    TRAINING = "training"
    COMPLETE = "complete"


@dataclass(frozen=True)
class ModelSummary:
    """A published model version, as the registry describes it."""

    name: str
    version: int
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class RoundTask:
    """The cloud's answer to "what should I do now?"."""

    state: RoundState
    round: int
    weights: Weights = field(default_factory=dict)
    deadline_seconds: float = 0.0
    retry_after_seconds: float = 0.0
    server_model_version: int = 0
    model: ModelSummary | None = None
    session: object | None = None  # split mode: the round's split session (edge: SessionInfo)
    devices: int = 0
    # fedwire: with a base, ``weights`` are float32 deltas against the weights of that
    # digest (on the edge, decoded) and ``packed`` their int8 form (on the cloud).
    weights_base: int = 0
    weights_digest: int = 0
    packed: dict[str, Encoded] = field(default_factory=dict)


@dataclass(frozen=True)
class Update:
    """A device's contribution to a round: weights and figures, never data."""

    member_id: str
    round: int
    weights: Weights
    num_samples: int
    heldout_accuracy: float = 0.0
    steps: int = 0
    # fedwire: with a base, ``weights`` are float32 deltas against the round's student of
    # that digest (on the cloud, decoded) and ``packed`` their int8 form (on the edge).
    weights_base: int = 0
    packed: dict[str, Encoded] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateAnswer:
    accepted: bool
    round: int
    duplicate: bool = False
