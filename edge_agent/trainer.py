"""The edge's half of split KD: heads forward, cloud round trip, head backward.

Network-free: it talks to the cloud through a ``SplitTransport`` (the gRPC
client in production, the cloud's logic directly in tests), so the same loop
is what the equivalence test checks against centralised KD.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from edge_agent.errors import EdgeError
from splitkd import checkpoint
from splitkd.data.specs import Dataset
from splitkd.messages import SessionInfo, StepOutcome
from splitkd.models import zoo
from splitkd.models.normalize import fit_inputs
from splitkd.models.staged import StagedModel
from splitkd.training import batch_order, make_optimizer, steps_per_epoch


class CheckpointStore(Protocol):
    def save_state(self, state: checkpoint.TrainingState) -> None: ...


class SplitTransport(Protocol):
    def step(
        self,
        step: int,
        student: np.ndarray,
        teacher: np.ndarray | None,
        labels: np.ndarray,
        next_teacher: np.ndarray | None = None,
        kd_alpha: float | None = None,
    ) -> StepOutcome: ...

    def evaluate(self, activations: np.ndarray, *, teacher: bool = False) -> np.ndarray: ...


@dataclass
class StepRecord:
    """One step as the edge saw it; the run report and the metrics read these."""

    step: int
    epoch: int
    batch: int
    loss: float
    kd_loss: float
    ce_loss: float
    correct: int
    forward_seconds: float  # device compute: both heads forward
    network_seconds: float  # round trip: encode, send, cloud compute, receive, decode
    backward_seconds: float  # device compute: head backward + optimizer step
    bytes_up: int = 0
    bytes_down: int = 0
    replayed: bool = False


@dataclass
class EvalRecord:
    step: int
    epoch: int
    accuracy: float  # split model (device head + cloud tail) on the held-out split


@dataclass
class TrainResult:
    steps: int
    history: list[StepRecord] = field(default_factory=list)
    evaluations: list[EvalRecord] = field(default_factory=list)
    wall_seconds: float = 0.0

    def history_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.history]


def build_head(
    spec_stages: StagedModel, cut: int, state: dict[str, np.ndarray]
) -> torch.nn.Sequential:
    spec_stages.load_part(0, cut, state)
    return spec_stages.part(0, cut)


class EdgeTrainer:
    def __init__(
        self,
        session: SessionInfo,
        train: Dataset,
        heldout: Dataset,
        transport: SplitTransport,
        store: CheckpointStore | None = None,
    ) -> None:
        self.session = session
        self.train_data = train
        self.heldout = heldout
        self.transport = transport
        self.hyper = session.hyper
        # The student is built whole from its spec so that head state names match
        # the cloud's; only the head is used and trained here.
        self.student = zoo.build(session.student_spec)
        self.student_head = build_head(self.student, session.student_cut, session.student_head)
        # Input statistics from this device's own training split: raw data stays
        # here, the statistics travel in the head weights (a resumed snapshot
        # carries the same, fitted on the same split).
        fit_inputs(self.student_head, train.x)
        # The teacher head is frozen: built from the spec, loaded, never trained.
        teacher = zoo.build(session.teacher_spec)
        self.teacher_head = build_head(teacher, session.teacher_cut, session.teacher_head)
        self.teacher_head.requires_grad_(False)
        self.teacher_head.eval()
        self.optimizer = make_optimizer(self.student_head.parameters(), self.hyper)
        self.next_step = session.next_step
        self.history: list[StepRecord] = []
        self.evaluations: list[EvalRecord] = []
        # Restorable states by step, the same steps the cloud keeps (step 0 and
        # the latest multiples of checkpoint_every), in memory and in ``store``.
        self.store = store
        self.snapshots: dict[int, checkpoint.TrainingState] = {}
        self.repeated_steps = 0
        # The step whose teacher activations the cloud already holds (sent ahead).
        self._teacher_sent: int | None = None
        # The KD weight this edge chose (edge_agent/teacher_check.py); None: the cloud's.
        self.kd_alpha: float | None = None

    def _head_tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.head_state().items()}

    def take_snapshot(self) -> checkpoint.TrainingState:
        state = checkpoint.snapshot(self.next_step, self._head_tensors(), self.optimizer)
        self.snapshots[state.step] = state
        for step in sorted(self.snapshots)[: -checkpoint.KEEP_CHECKPOINTS]:
            if step != 0:
                del self.snapshots[step]
        if self.store is not None:
            self.store.save_state(state)
        return state

    def restorable_steps(self) -> list[int]:
        return sorted({*self.snapshots, self.next_step})

    def load(self, state: checkpoint.TrainingState) -> None:
        """Make ``state`` the live head and optimizer, at ``state.step``."""
        self.student.load_part(
            0, self.session.student_cut, {k: v.numpy() for k, v in state.model.items()}
        )
        self.optimizer.load_state_dict(checkpoint.copy_optimizer_state(state.optimizer))
        self.snapshots.setdefault(state.step, state)
        self.next_step = state.step
        self._teacher_sent = None  # the cloud drops what was sent ahead when it rolls back

    def restore(self, step: int) -> None:
        """Roll back to ``step``, agreed with the cloud; later records are dropped."""
        self._teacher_sent = None  # whatever went ahead, the cloud no longer holds it
        if step != self.next_step:
            if step not in self.snapshots:
                raise EdgeError(
                    f"cannot restore step {step}; this edge has {self.restorable_steps()}"
                )
            self.repeated_steps += self.next_step - step
            self.load(self.snapshots[step])
            for later in [s for s in self.snapshots if s > step]:
                del self.snapshots[later]
        self.history = [r for r in self.history if r.step < step]
        self.evaluations = [e for e in self.evaluations if e.step <= step]

    @property
    def total_steps(self) -> int:
        return self.hyper.epochs * steps_per_epoch(len(self.train_data), self.hyper.batch_size)

    def head_state(self) -> dict[str, np.ndarray]:
        return self.student.part_state(0, self.session.student_cut)

    def run(
        self,
        on_step: Callable[[StepRecord], None] | None = None,
        on_eval: Callable[[EvalRecord], None] | None = None,
        traffic: Callable[[], tuple[int, int]] | None = None,
    ) -> TrainResult:
        """Train from ``next_step`` to the end; call again after ``restore`` to go on."""
        started = time.perf_counter()
        x, y = torch.from_numpy(self.train_data.x), self.train_data.y
        if not self.snapshots:
            self.take_snapshot()
        schedule = self.schedule()
        self.student_head.train()
        for step in range(self.next_step, len(schedule)):
            epoch, index = schedule[step]
            ahead = x[torch.from_numpy(schedule[step + 1][1])] if step + 1 < len(schedule) else None
            record = self._step(step, epoch, x[torch.from_numpy(index)], y[index], traffic, ahead)
            self.history.append(record)
            if on_step is not None:
                on_step(record)
            if (step + 1) % self.hyper.checkpoint_every == 0:
                self.take_snapshot()
            last_of_epoch = step + 1 == len(schedule) or schedule[step + 1][0] != epoch
            if last_of_epoch:
                evaluation = EvalRecord(step + 1, epoch, self.evaluate_split())
                self.evaluations.append(evaluation)
                if on_eval is not None:
                    on_eval(evaluation)
        step = len(schedule)
        result = TrainResult(
            steps=step, history=list(self.history), evaluations=list(self.evaluations)
        )
        result.wall_seconds = time.perf_counter() - started
        return result

    def schedule(self) -> list[tuple[int, np.ndarray]]:
        """(epoch, sample indices) of every step: a pure function of (seed, epoch)."""
        return [
            (epoch, index)
            for epoch in range(self.hyper.epochs)
            for index in batch_order(
                len(self.train_data), self.hyper.batch_size, self.hyper.seed, epoch
            )
        ]

    def _step(
        self,
        step: int,
        epoch: int,
        inputs: torch.Tensor,
        labels: np.ndarray,
        traffic: Callable[[], tuple[int, int]] | None,
        next_inputs: torch.Tensor | None = None,
    ) -> StepRecord:
        t0 = time.perf_counter()
        student_act = self.student_head(inputs)
        with torch.no_grad():
            # This step's teacher activations went ahead with the previous step
            # (the cloud already has its tail's output); send the next step's now.
            teacher_act = None if self._teacher_sent == step else self.teacher_head(inputs).numpy()
            ahead = None if next_inputs is None else self.teacher_head(next_inputs).numpy()
        t1 = time.perf_counter()
        before = traffic() if traffic else (0, 0)
        flat = labels.reshape(-1)  # a language model's labels are [B, T]: flat on the wire
        reply = self.transport.step(
            step, student_act.detach().numpy(), teacher_act, flat, ahead, self.kd_alpha
        )
        self._teacher_sent = step + 1 if reply.next_teacher_accepted else None
        after = traffic() if traffic else (0, 0)
        t2 = time.perf_counter()
        self.optimizer.zero_grad()
        student_act.backward(torch.from_numpy(reply.gradient))
        self.optimizer.step()
        t3 = time.perf_counter()
        self.next_step = step + 1
        return StepRecord(
            step=step,
            epoch=epoch,
            batch=len(labels),
            loss=reply.loss,
            kd_loss=reply.kd_loss,
            ce_loss=reply.ce_loss,
            correct=reply.correct,
            forward_seconds=t1 - t0,
            network_seconds=t2 - t1,
            backward_seconds=t3 - t2,
            bytes_up=after[0] - before[0],
            bytes_down=after[1] - before[1],
            replayed=reply.replayed,
        )

    def evaluate_split(self) -> float:
        """Accuracy of head + cloud tail on the held-out split; labels never leave."""
        self.student_head.eval()
        try:
            return self._heldout_accuracy(self.student_head, teacher=False)
        finally:
            self.student_head.train()

    def evaluate_teacher(self) -> float:
        """The teacher's accuracy on this device's held-out split, through the split."""
        return self._heldout_accuracy(self.teacher_head, teacher=True)

    @torch.no_grad()
    def _heldout_accuracy(
        self, head: torch.nn.Module, *, teacher: bool, batch_size: int = 256
    ) -> float:
        correct = 0
        for start in range(0, len(self.heldout), batch_size):
            x = torch.from_numpy(self.heldout.x[start : start + batch_size])
            logits = self.transport.evaluate(head(x).numpy(), teacher=teacher)
            labels = self.heldout.y[start : start + batch_size].reshape(-1)  # per token for an LM
            correct += int((logits.reshape(len(labels), -1).argmax(axis=1) == labels).sum())
        return correct / max(1, self.heldout.y.size)


class GrpcTransport:
    """``SplitTransport`` over the gRPC client for one session."""

    def __init__(self, client: Any, session_id: str, wire_dtype: int) -> None:
        self.client = client
        self.session_id = session_id
        self.wire_dtype = wire_dtype

    def step(
        self,
        step: int,
        student: np.ndarray,
        teacher: np.ndarray | None,
        labels: np.ndarray,
        next_teacher: np.ndarray | None = None,
        kd_alpha: float | None = None,
    ) -> StepOutcome:
        reply: StepOutcome = self.client.step(
            self.session_id, step, student, teacher, labels, self.wire_dtype, next_teacher, kd_alpha
        )
        return reply

    def evaluate(self, activations: np.ndarray, *, teacher: bool = False) -> np.ndarray:
        logits: np.ndarray = self.client.evaluate(
            self.session_id, activations, self.wire_dtype, teacher=teacher
        )
        return logits
