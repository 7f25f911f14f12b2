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

from edge_agent.errors import CloudRefused, EdgeError
from splitkd import checkpoint, codecs
from splitkd.codecs import Encoded
from splitkd.data.specs import Dataset
from splitkd.messages import SessionInfo, StepOutcome
from splitkd.models import zoo
from splitkd.models.normalize import fit_inputs
from splitkd.models.staged import StagedModel
from splitkd.names import TEACHER_CACHE_MISS as CACHE_MISS
from splitkd.training import batch_order, make_optimizer, steps_per_epoch


class CheckpointStore(Protocol):
    def save_state(self, state: checkpoint.TrainingState) -> None: ...


class SplitTransport(Protocol):
    def step(
        self,
        step: int,
        student: np.ndarray,
        teacher: np.ndarray | None,
        labels: np.ndarray | None,
        next_teacher: np.ndarray | None = None,
        kd_alpha: float | None = None,
        sample_ids: np.ndarray | None = None,
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
    # Steps in flight (edge_agent/pipeline.py); 1: one at a time, as below.
    pipeline_depth: int = 1
    most_in_flight: int = 1

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
        # Which training samples' teacher outputs the cloud holds (teacher_cache.py);
        # None: no cache (not granted, too many samples, or turned off).
        # Held-out evaluation through the split every this many epochs (and after the
        # last): each one sends the held-out set's activations up.
        self.eval_every = 1
        fits = 0 < len(train) <= session.teacher_cache_samples
        self.cached: np.ndarray | None = np.zeros(len(train), dtype=bool) if fits else None
        self._teacher_seconds = 0.0

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
        self.forget_cache()

    def forget_cache(self) -> None:
        """Assume the cloud holds nothing (it may have restarted): send teacher outputs again."""
        if self.cached is not None:
            self.cached[:] = False

    def restore(self, step: int) -> None:
        """Roll back to ``step``, agreed with the cloud; later records are dropped."""
        self._teacher_sent = None  # whatever went ahead, the cloud no longer holds it
        self.forget_cache()
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
        if self.pipeline_depth > 1:
            from edge_agent import pipeline

            return pipeline.run(self, self.pipeline_depth, on_step, on_eval, traffic)
        started = time.perf_counter()
        x, y = torch.from_numpy(self.train_data.x), self.train_data.y
        if not self.snapshots:
            self.take_snapshot()
        schedule = self.schedule()
        self.student_head.train()
        for step in range(self.next_step, len(schedule)):
            epoch, index = schedule[step]
            ahead = schedule[step + 1][1] if step + 1 < len(schedule) else None
            record = self._step(step, epoch, x, y, index, traffic, ahead)
            self.history.append(record)
            if on_step is not None:
                on_step(record)
            if (step + 1) % self.hyper.checkpoint_every == 0:
                self.take_snapshot()
            last_of_epoch = step + 1 == len(schedule) or schedule[step + 1][0] != epoch
            if last_of_epoch and self.evaluates(epoch):
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

    def evaluates(self, epoch: int) -> bool:
        if self.eval_every == 0:  # none within the run (a cohort's round measures its start)
            return False
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.hyper.epochs

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
        x: torch.Tensor,
        y: np.ndarray,
        index: np.ndarray,
        traffic: Callable[[], tuple[int, int]] | None,
        next_index: np.ndarray | None = None,
    ) -> StepRecord:
        t0 = time.perf_counter()
        inputs = x[torch.from_numpy(index)]
        student_act = self.student_head(inputs)
        t1 = time.perf_counter()
        before = traffic() if traffic else (0, 0)
        try:
            reply = self._exchange(step, inputs, student_act, x, y, index, next_index)
        except CloudRefused as exc:
            if CACHE_MISS not in exc.details:
                raise
            # The cloud lost what it cached (it restarted): send this batch's again.
            self.forget_cache()
            self._teacher_sent = None
            reply = self._exchange(step, inputs, student_act, x, y, index, next_index)
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
            batch=len(index),
            loss=reply.loss,
            kd_loss=reply.kd_loss,
            ce_loss=reply.ce_loss,
            correct=reply.correct,
            forward_seconds=t1 - t0 + self._teacher_seconds,
            network_seconds=t2 - t1 - self._teacher_seconds,
            backward_seconds=t3 - t2,
            bytes_up=after[0] - before[0],
            bytes_down=after[1] - before[1],
            replayed=reply.replayed,
        )

    def _exchange(
        self,
        step: int,
        inputs: torch.Tensor,
        student_act: torch.Tensor,
        x: torch.Tensor,
        y: np.ndarray,
        index: np.ndarray,
        next_index: np.ndarray | None,
    ) -> StepOutcome:
        """Send the step: the teacher's side only for samples the cloud does not hold yet.

        Without a cache (or in the first epoch) the batch's teacher activations go with
        the step, unless they went ahead with the previous one; the next batch's go
        ahead. With the cache, a batch the cloud holds sends ids and student activations only.
        """
        started = time.perf_counter()
        held = self.cached is not None and bool(self.cached[index].all())
        teacher_act = labels = ahead = None
        if not held:
            labels = y[index].reshape(-1)  # a language model's labels are [B, T]: flat on the wire
            if self._teacher_sent != step:
                teacher_act = self._teacher(inputs)
        # After this step the cloud also holds this batch: the next may need nothing ahead.
        next_held = next_index is None or (
            self.cached is not None
            and bool((self.cached[next_index] | np.isin(next_index, index)).all())
        )
        if not next_held:
            assert next_index is not None
            ahead = self._teacher(x[torch.from_numpy(next_index)])
        self._teacher_seconds = time.perf_counter() - started
        ids = index.astype(np.int32) if self.cached is not None else None
        reply = self.transport.step(
            step, student_act.detach().numpy(), teacher_act, labels, ahead, self.kd_alpha, ids
        )
        if self.cached is not None and not held:
            self.cached[index] = True
        self._teacher_sent = step + 1 if reply.next_teacher_accepted else None
        return reply

    @torch.no_grad()
    def _teacher(self, inputs: torch.Tensor) -> np.ndarray:
        out: np.ndarray = self.teacher_head(inputs).numpy()
        return out

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
    """``SplitTransport`` over the gRPC client for one session, packing with its codec."""

    def __init__(self, client: Any, session: SessionInfo) -> None:
        self.client = client
        self.session_id = session.session_id
        name, ratio = session.hyper.wire_codec, session.hyper.topk_ratio
        # Student activations carry error feedback per sample (topk); the teacher's and
        # the evaluation's go once per sample, with the codec's no-memory variant.
        self.student_codec = codecs.make(name, seed=session.hyper.seed, topk_ratio=ratio)
        self.once_codec = codecs.make(codecs.evaluation_codec(name))
        self.gradient_codec = codecs.make(name, topk_ratio=ratio)
        # A step sent again (after a cache miss) reuses its packing: error feedback
        # must see each step's activations once.
        self._packed: tuple[int, Encoded] | None = None

    def step(
        self,
        step: int,
        student: np.ndarray,
        teacher: np.ndarray | None,
        labels: np.ndarray | None,
        next_teacher: np.ndarray | None = None,
        kd_alpha: float | None = None,
        sample_ids: np.ndarray | None = None,
    ) -> StepOutcome:
        reply: StepOutcome = self.client.step(
            self.session_id,
            step,
            self._pack_student(step, student, sample_ids),
            None if teacher is None else self.once_codec.encode(teacher),
            labels,
            None if next_teacher is None else self.once_codec.encode(next_teacher),
            kd_alpha,
            sample_ids,
        )
        assert reply.encoded is not None
        self.gradient_codec.check(reply.encoded, "the cloud's gradient")
        return reply

    def _pack_student(self, step: int, student: np.ndarray, ids: np.ndarray | None) -> Encoded:
        packed = self._packed  # one read: pipelined steps pack on worker threads
        if packed is None or packed[0] != step:
            packed = (step, self.student_codec.encode(student, ids))
            self._packed = packed
        return packed[1]

    def evaluate(self, activations: np.ndarray, *, teacher: bool = False) -> np.ndarray:
        logits: np.ndarray = self.client.evaluate(
            self.session_id, self.once_codec.encode(activations), teacher=teacher
        )
        return logits
