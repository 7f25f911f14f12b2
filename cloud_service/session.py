"""One edge's split-KD session: the cloud half of every training step.

No network here: the servicer decodes messages into numpy arrays and calls
these methods, so the logic is tested in-process and the wire separately.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cloud_service.batcher import TEACHER_BATCHER
from cloud_service.compute import TENSOR_WORK
from cloud_service.teacher_cache import TeacherCache
from splitkd import checkpoint, codecs
from splitkd.codecs import Encoded
from splitkd.errors import FailedPrecondition, InvalidArgument
from splitkd.hyper import Hyperparameters
from splitkd.kd import KDLoss, kd_loss, per_token
from splitkd.messages import SessionInfo, StepOutcome
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec, labels_per_sample
from splitkd.models.staged import StagedModel
from splitkd.training import make_optimizer, weight_tensor

# Teacher tails computed ahead of their step (see Session.step), for all sessions.
_TEACHER_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="teacher")

# One batch is at most this many samples; the edge's batch size is far below.
MAX_BATCH = 4096


@dataclass
class SessionTimes:
    """Seconds of cloud compute in the last step, by part (for metrics)."""

    teacher_seconds: float = 0.0
    student_seconds: float = 0.0


@dataclass
class Session:
    session_id: str
    device_id: str
    student_spec: ModelSpec
    teacher_spec: ModelSpec
    student_cut: int
    teacher_cut: int
    hyper: Hyperparameters
    model_name: str
    student: StagedModel
    teacher: StagedModel  # shared with every session, frozen, never trained here
    teacher_version: int = 1  # the server model version this session distils from
    # A cohort round's session lives in memory only: after a restart the device
    # fetches the round again and gets a new one.
    persisted: bool = True
    device_profile: str = ""
    link_profile: str = ""
    # Steps the edge keeps in flight: early steps within it wait for their turn.
    pipeline_depth: int = 1
    # Weights of the CE term per class, chosen by the device (empty: none).
    class_weights: tuple[float, ...] = ()
    next_step: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    finished_version: int | None = None
    times: SessionTimes = field(default_factory=SessionTimes)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Pipelined steps wait on it for their turn (cloud_service/pipeline.py).
    turn: threading.Condition = field(init=False, repr=False)
    _optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    _last: StepOutcome | None = field(default=None, repr=False)
    # The last step's inputs, to recognise a retry: copies or digests, never views
    # that would keep a whole request (up to the message limit) alive per session.
    _last_inputs: tuple[object, ...] = field(default=(), repr=False)
    _student_shape: tuple[int, ...] = ()
    _teacher_shape: tuple[int, ...] = ()
    _class_weights: torch.Tensor | None = field(default=None, repr=False)
    # Restorable states by step: step 0 and the latest few multiples of
    # hyper.checkpoint_every (the edge keeps the same steps).
    snapshots: dict[int, checkpoint.TrainingState] = field(default_factory=dict, repr=False)
    # The next step's teacher activations, sent ahead: waiting to start (step,
    # activations), then computing in the background (step, future).
    _ahead: tuple[int, np.ndarray] | None = field(default=None, repr=False)
    _prefetch: tuple[int, Future[tuple[torch.Tensor, float]]] | None = field(
        default=None, repr=False
    )
    # Teacher outputs per sample (None: the session was granted no cache).
    cache: TeacherCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.turn = threading.Condition(self.lock)
        self.student_spec.check_cut(self.student_cut, "student cut")
        self.teacher_spec.check_cut(self.teacher_cut, "teacher cut")
        tail = self.student.stages[self.student_cut :]
        self._optimizer = make_optimizer(tail.parameters(), self.hyper)
        self._student_shape = zoo.activation_shape(self.student_spec, self.student_cut)
        self._teacher_shape = zoo.activation_shape(self.teacher_spec, self.teacher_cut)
        self._class_weights = weight_tensor(self.class_weights)
        # One codec per stream: the gradient's carries error feedback (topk) and a
        # random stream (stochastic rounding); teacher and evaluation activations
        # go once per sample, so they use the codec's no-memory variant.
        name, ratio = self.hyper.wire_codec, self.hyper.topk_ratio
        self._student_codec = codecs.make(name, topk_ratio=ratio)
        self._gradient_codec = codecs.make(name, seed=self.hyper.seed, topk_ratio=ratio)
        self._teacher_codec = codecs.make(codecs.evaluation_codec(name))
        if not self.snapshots:
            self.snapshots[self.next_step] = self.take_snapshot()

    def take_snapshot(self) -> checkpoint.TrainingState:
        assert self._optimizer is not None
        return checkpoint.snapshot(self.next_step, self.student.state_dict(), self._optimizer)

    def keep_snapshot(self, state: checkpoint.TrainingState) -> None:
        self.snapshots[state.step] = state
        for step in sorted(self.snapshots)[: -checkpoint.KEEP_CHECKPOINTS]:
            if step != 0:
                del self.snapshots[step]

    def due_for_checkpoint(self) -> bool:
        every = self.hyper.checkpoint_every
        return self.next_step % every == 0 and self.next_step not in self.snapshots

    def restorable_steps(self) -> list[int]:
        return sorted({*self.snapshots, self.next_step})

    def restore(self, step: int) -> None:
        """Roll back to ``step`` (a snapshot, or the live state); callers hold ``self.lock``."""
        if step == self.next_step:
            return
        if step not in self.snapshots:
            raise FailedPrecondition(
                f"the cloud cannot restore step {step}; it can restore {self.restorable_steps()}"
            )
        self.load(self.snapshots[step])
        for later in [s for s in self.snapshots if s > step]:
            del self.snapshots[later]

    def load(self, state: checkpoint.TrainingState) -> None:
        """Make ``state`` the live state (the student and its optimizer at ``state.step``)."""
        assert self._optimizer is not None
        self.student.load_state_dict(state.model)
        # A copy: the live optimizer updates its state in place.
        self._optimizer.load_state_dict(checkpoint.copy_optimizer_state(state.optimizer))
        self.next_step = state.step
        self._last, self._last_inputs = None, ()
        self._prefetch = None
        self._ahead = None
        self._gradient_codec.reset()

    @property
    def student_activation_shape(self) -> tuple[int, ...]:
        return self._student_shape

    @property
    def teacher_activation_shape(self) -> tuple[int, ...]:
        return self._teacher_shape

    @property
    def num_classes(self) -> int:
        return self.student_spec.num_classes

    def _check_batch(self, student_act: np.ndarray, labels: np.ndarray | None) -> int:
        batch = student_act.shape[0]
        if not 1 <= batch <= MAX_BATCH:
            raise InvalidArgument(f"batch of {batch} samples is outside 1..{MAX_BATCH}")
        if labels is not None:
            # A language model's labels are its next tokens, batch x context of them, flat.
            expected = batch * labels_per_sample(self.student_spec)
            if labels.shape != (expected,):
                raise InvalidArgument(
                    f"labels have shape {list(labels.shape)}, expected [{expected}]"
                )
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise InvalidArgument(f"labels must be in 0..{self.num_classes - 1}")
        return batch

    def step(
        self,
        step: int,
        student_act: np.ndarray,
        teacher_act: np.ndarray | None,
        labels: np.ndarray | None,
        next_teacher_act: np.ndarray | None = None,
        kd_alpha: float | None = None,
        sample_ids: np.ndarray | None = None,
    ) -> StepOutcome:
        """Finish both forward passes, apply the KD loss, update the tail, return the cut gradient.

        ``teacher_act`` may be None when the edge sent this step's teacher
        activations ahead, with the previous step (``next_teacher_act``): the
        cloud then computed the teacher's tail while the edge was busy with its
        backward pass, off the step's critical path. The teacher is frozen, so
        this changes when the arithmetic happens, never what it computes.

        With ``sample_ids`` (the batch's positions in the device's training
        order) the teacher's outputs and the labels are cached per sample: a
        step without teacher activations and labels takes them from the cache
        (``teacher_cache.py``).

        ``kd_alpha`` is the edge's choice of KD weight (from its measure of the
        teacher on its own data); None means the session's hyperparameter.

        Callers hold ``self.lock``. A resent last step (same number, same bytes)
        returns the stored result and changes nothing.
        """
        inputs = (student_act, teacher_act, labels, next_teacher_act, sample_ids)
        if self._last is not None and step == self._last.step:
            if _fingerprint(inputs) == self._last_inputs:
                return replace(self._last, replayed=True)
            raise FailedPrecondition(f"step {step} was already applied with different data")
        self._check_order(step)
        batch = self._check_batch(student_act, labels)
        if teacher_act is not None and teacher_act.shape[0] != batch:
            raise InvalidArgument(
                f"teacher activations have {teacher_act.shape[0]} samples, student activations {batch}"
            )
        ids = self._check_ids(sample_ids, batch)
        # The student's tail first: a teacher tail computing ahead finishes meanwhile.
        student_started = time.perf_counter()
        with TENSOR_WORK:  # one step's tensors at a time (compute.py); never held while waiting
            if not self.student.training:  # train() walks every submodule: once, not per step
                self.student.train()
            cut = torch.from_numpy(student_act.astype(np.float32)).requires_grad_(True)
            student_logits = self.student.run(cut, self.student_cut, len(self.student.stages))
        teacher_logits, labels, teacher_seconds = self._targets(
            step, batch, teacher_act, labels, ids
        )
        with TENSOR_WORK:
            loss = kd_loss(
                student_logits,
                teacher_logits,
                torch.from_numpy(labels.astype(np.int64)),
                self.hyper.kd_alpha if kd_alpha is None else kd_alpha,
                self.hyper.kd_temperature,
                self._class_weights,
            )
            gradient = self._apply(step, loss, cut)
            predicted = per_token(student_logits.detach()).argmax(dim=1).numpy()
        if ids is not None and (teacher_act is not None or self._ahead_for(step)):
            assert self.cache is not None
            self.cache.put(ids, teacher_logits, labels)
        correct = int((predicted == labels).sum())
        self.times = SessionTimes(teacher_seconds, time.perf_counter() - student_started)
        self._prefetch = None
        # Kept until the next step: a copy (not a view on the request), and only for a
        # batch the session's own batch size allows, which bounds what one peer holds here.
        keep_ahead = (
            next_teacher_act is not None and next_teacher_act.shape[0] <= self.hyper.batch_size
        )
        self._ahead = (step + 1, np.array(next_teacher_act)) if keep_ahead else None
        encoded = self._gradient_codec.encode(gradient, ids)
        result = StepOutcome(
            next_teacher_accepted=keep_ahead,
            step=step,
            gradient=self._gradient_codec.decode(encoded),
            loss=float(loss.total.detach()),
            kd_loss=float(loss.kd.detach()),
            ce_loss=float(loss.ce.detach()),
            correct=correct,
            encoded=encoded,
        )
        self._last, self._last_inputs = result, _fingerprint(inputs)
        self.next_step = step + 1
        return result

    def _check_order(self, step: int) -> None:
        if self.finished_version is not None:
            raise FailedPrecondition("this session is finished; register again to train more")
        if step != self.next_step:
            raise FailedPrecondition(
                f"step {step} is out of order: the cloud expects step {self.next_step}"
            )

    def _check_ids(self, sample_ids: np.ndarray | None, batch: int) -> np.ndarray | None:
        if sample_ids is None:
            return None
        if self.cache is None:
            raise FailedPrecondition(
                "this session has no teacher-output cache: send steps without sample_ids "
                "(register with train_samples to be granted one)"
            )
        return self.cache.check_ids(sample_ids, batch)

    def _targets(
        self,
        step: int,
        batch: int,
        teacher_act: np.ndarray | None,
        labels: np.ndarray | None,
        ids: np.ndarray | None,
    ) -> tuple[torch.Tensor, np.ndarray, float]:
        """The teacher's logits and the labels of this batch: sent, sent ahead, or cached."""
        if teacher_act is None and not self._ahead_for(step):
            if ids is None or labels is not None:
                raise FailedPrecondition(
                    f"step {step} has no teacher activations, and none were sent ahead with step "
                    f"{step - 1}; send them (or resume)"
                )
            assert self.cache is not None
            logits, cached_labels = self.cache.get(ids)
            return logits, cached_labels, 0.0
        if labels is None:
            raise InvalidArgument(f"step {step} carries teacher activations but no labels")
        if teacher_act is not None:
            logits, seconds = self._teacher_logits(teacher_act)
        else:
            logits, seconds = self._ahead_logits()
        if logits.shape[0] != batch:
            raise InvalidArgument(
                f"the teacher activations sent ahead for step {step} have "
                f"{logits.shape[0]} samples, student activations {batch}"
            )
        return logits, labels, seconds

    def _apply(self, step: int, loss: KDLoss, cut: torch.Tensor) -> np.ndarray:
        """Backward and optimizer step; the gradient at the cut."""
        assert self._optimizer is not None
        self._optimizer.zero_grad()
        loss.total.backward()
        assert cut.grad is not None
        if not (torch.isfinite(loss.total) and torch.isfinite(cut.grad).all()):
            # Finite but absurd activations (1e38) overflow inside the tail: refuse
            # the step before the optimizer turns this session's weights into NaN.
            self._optimizer.zero_grad()
            raise InvalidArgument(
                f"step {step}: these activations give a non-finite loss or gradient; "
                "the step was not applied (are the inputs scaled as in training?)"
            )
        self._optimizer.step()
        return cut.grad.numpy()

    def accept(self, encoded: Encoded, what: str, *, teacher: bool = False) -> np.ndarray:
        """Activations as the session's codec packs them, decoded (any other packing refused)."""
        wire = self._teacher_codec if teacher else self._student_codec
        wire.check(encoded, what)
        return wire.decode(encoded)

    def accept_evaluation(self, encoded: Encoded, what: str) -> np.ndarray:
        self._teacher_codec.check(encoded, what)
        return self._teacher_codec.decode(encoded)

    def start_ahead(self) -> None:
        """Start the teacher tail of the activations sent ahead, in the background.

        The transport calls this once this step's answer is on its way (gRPC's
        RPC-done callback): started earlier, the helper thread would compete for
        the GIL with the answer being built. Callers hold ``self.lock``.
        """
        if self._ahead is not None:
            step, activations = self._ahead
            self._prefetch = (step, _TEACHER_POOL.submit(self._teacher_logits, activations))
            self._ahead = None

    def _ahead_for(self, step: int) -> bool:
        started = self._prefetch is not None and self._prefetch[0] == step
        return started or (self._ahead is not None and self._ahead[0] == step)

    def _ahead_logits(self) -> tuple[torch.Tensor, float]:
        if self._ahead is not None:  # never started (no transport callback): compute now
            return self._teacher_logits(self._ahead[1])
        assert self._prefetch is not None
        return self._prefetch[1].result()

    def _teacher_logits(self, teacher_act: np.ndarray) -> tuple[torch.Tensor, float]:
        # Batched with other sessions' steps arriving at the same time (cloud_service/batcher.py).
        return TEACHER_BATCHER.run(self.teacher, self.teacher_cut, teacher_act)

    def evaluate(self, student_act: np.ndarray) -> np.ndarray:
        self._check_batch(student_act, None)
        self.student.eval()
        with TENSOR_WORK, torch.no_grad():
            logits = self.student.run(
                torch.from_numpy(student_act.astype(np.float32)),
                self.student_cut,
                len(self.student.stages),
            )
        # One row per sample on the wire: a language model's [B, T, V] as [B, T * V].
        return logits.reshape(len(logits), -1).numpy()

    def evaluate_teacher(self, teacher_act: np.ndarray) -> np.ndarray:
        """The teacher tail's logits, so the edge can measure the teacher on its own data."""
        self._check_batch(teacher_act, None)
        logits, _ = self._teacher_logits(teacher_act)
        return logits.reshape(len(logits), -1).numpy()

    def assemble(self, head_state: dict[str, np.ndarray]) -> StagedModel:
        """The whole student: the edge's trained head plus the cloud's trained tail."""
        whole = zoo.build(self.student_spec)
        whole.load_state_dict(self.student.state_dict())
        whole.load_part(0, self.student_cut, head_state)
        whole.eval()
        return whole

    def info(self, teacher_accuracy: float | None = None) -> SessionInfo:
        """What the edge needs to train this session (Register's and Resume's answer)."""
        return SessionInfo(
            session_id=self.session_id,
            student_spec=self.student_spec,
            teacher_spec=self.teacher_spec,
            student_cut=self.student_cut,
            teacher_cut=self.teacher_cut,
            student_head=self.student.part_state(0, self.student_cut),
            teacher_head=self.teacher.part_state(0, self.teacher_cut),
            hyper=self.hyper,
            next_step=self.next_step,
            model_name=self.model_name,
            teacher_accuracy=teacher_accuracy,
            teacher_cache_samples=0 if self.cache is None else self.cache.capacity,
        )

    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.student.part_shapes(0, self.student_cut)


# Inputs up to this size are kept as bytes (a copy costs microseconds); larger
# ones as a digest, so a retry is still recognised without holding megabytes.
_COPY_LIMIT = 256 * 1024


def _fingerprint(arrays: tuple[np.ndarray | None, ...]) -> tuple[object, ...]:
    """What identifies a step's inputs: a retry of the last step has the same.

    Computed once per step and compared only when a step number repeats.
    """
    return tuple(
        None if a is None else (a.dtype.str, a.shape, _content(np.ascontiguousarray(a)))
        for a in arrays
    )


def _content(array: np.ndarray) -> bytes:
    if array.nbytes <= _COPY_LIMIT:
        return array.tobytes()
    return hashlib.blake2b(array.data).digest()
