"""Pipelined split steps (opt-in, ``--pipeline-depth N``): up to N steps in flight.

On a link whose round trip is long against a step's compute, one step at a
time leaves the device and the cloud idle for most of the round trip. Here the
edge sends step k + 1 (its forward pass done with the head as it is now) before
step k's gradient is back; each gradient is applied when it arrives, at most
N - 1 steps late (a bounded window). Weight stashing keeps that gradient
exact for the weights it was computed with: each step's forward runs on a copy
of the head's parameters, the cloud's gradient is back-propagated through that
copy, and the result is applied to the live head (asynchronous SGD with a
bounded staleness, as PipeDream's weight stashing).

The window drains at every checkpoint step and at the end of every epoch, so
snapshots, evaluations and a resume after a fault see a consistent head, and
no sample appears twice in flight. Teacher activations travel with their own
step (nothing goes ahead). The cloud lets a step that arrives before its
predecessor wait for its turn (cloud_service/pipeline.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import functional_call

from splitkd.messages import StepOutcome

if TYPE_CHECKING:
    from edge_agent.trainer import EdgeTrainer, EvalRecord, StepRecord, TrainResult

MAX_DEPTH = 4


@dataclass
class InFlight:
    step: int
    epoch: int
    batch: int
    activations: torch.Tensor  # computed from ``stash``, graph kept for the backward
    stash: dict[str, torch.Tensor]
    reply: Future[StepOutcome]
    forward_seconds: float


def check_depth(depth: int) -> int:
    from edge_agent.errors import EdgeError

    if not 1 <= depth <= MAX_DEPTH:
        raise EdgeError(f"--pipeline-depth must be in 1..{MAX_DEPTH}, got {depth}")
    return depth


class Pipeline:
    def __init__(
        self,
        trainer: EdgeTrainer,
        depth: int,
        traffic: Callable[[], tuple[int, int]] | None,
    ) -> None:
        self.trainer = trainer
        self.depth = check_depth(depth)
        self.traffic = traffic
        self.window: deque[InFlight] = deque()
        self.most_in_flight = 0
        self._bytes = traffic() if traffic else (0, 0)

    def send(
        self,
        pool: ThreadPoolExecutor,
        step: int,
        epoch: int,
        x: torch.Tensor,
        y: np.ndarray,
        index: np.ndarray,
    ) -> None:
        trainer = self.trainer
        started = time.perf_counter()
        inputs = x[torch.from_numpy(index)]
        head = trainer.student_head
        stash = {
            name: p.detach().clone().requires_grad_(True) for name, p in head.named_parameters()
        }
        activations = functional_call(head, stash, (inputs,))
        held = trainer.cached is not None and bool(trainer.cached[index].all())
        teacher = labels = None
        if not held:
            labels = y[index]
            teacher = trainer._teacher(inputs)
            if trainer.cached is not None:
                trainer.cached[index] = True  # a failed step restores, which forgets the cache
        ids = index.astype(np.int32) if trainer.cached is not None else None
        forward = time.perf_counter() - started
        reply = pool.submit(
            trainer.transport.step,
            step,
            activations.detach().numpy(),
            teacher,
            labels,
            None,
            trainer.kd_alpha,
            ids,
        )
        self.window.append(InFlight(step, epoch, len(index), activations, stash, reply, forward))
        self.most_in_flight = max(self.most_in_flight, len(self.window))

    def apply_oldest(self) -> StepRecord:
        """Wait for the oldest step's gradient and apply it to the live head."""
        from edge_agent.trainer import StepRecord

        flight = self.window.popleft()
        waited_from = time.perf_counter()
        reply = flight.reply.result()
        received = time.perf_counter()
        trainer = self.trainer
        grads = torch.autograd.grad(
            flight.activations, list(flight.stash.values()), torch.from_numpy(reply.gradient)
        )
        trainer.optimizer.zero_grad()
        for parameter, grad in zip(trainer.student_head.parameters(), grads, strict=True):
            parameter.grad = grad
        trainer.optimizer.step()
        trainer.next_step = flight.step + 1
        now = self.traffic() if self.traffic else (0, 0)
        # Bytes since the previous record: with calls overlapping, a step's own share
        # is not separable; the totals are exact.
        up, down = now[0] - self._bytes[0], now[1] - self._bytes[1]
        self._bytes = now
        return StepRecord(
            step=flight.step,
            epoch=flight.epoch,
            batch=flight.batch,
            loss=reply.loss,
            kd_loss=reply.kd_loss,
            ce_loss=reply.ce_loss,
            correct=reply.correct,
            forward_seconds=flight.forward_seconds,
            # What the device waited for this answer (the rest of its flight overlapped
            # other steps' work): the energy estimate books it as idle.
            network_seconds=received - waited_from,
            backward_seconds=time.perf_counter() - received,
            bytes_up=up,
            bytes_down=down,
            replayed=reply.replayed,
        )


def run(
    trainer: EdgeTrainer,
    depth: int,
    on_step: Callable[[StepRecord], None] | None,
    on_eval: Callable[[EvalRecord], None] | None,
    traffic: Callable[[], tuple[int, int]] | None,
) -> TrainResult:
    """``EdgeTrainer.run`` with up to ``depth`` steps in flight."""
    from edge_agent.trainer import EvalRecord, TrainResult

    started = time.perf_counter()
    x, y = torch.from_numpy(trainer.train_data.x), trainer.train_data.y
    if not trainer.snapshots:
        trainer.take_snapshot()
    schedule = trainer.schedule()
    trainer.student_head.train()
    pipeline = Pipeline(trainer, depth, traffic)
    every = trainer.hyper.checkpoint_every
    with ThreadPoolExecutor(depth, thread_name_prefix="step") as pool:
        try:
            for step in range(trainer.next_step, len(schedule)):
                epoch, index = schedule[step]
                pipeline.send(pool, step, epoch, x, y, index)
                last_of_epoch = step + 1 == len(schedule) or schedule[step + 1][0] != epoch
                drain = last_of_epoch or (step + 1) % every == 0
                while len(pipeline.window) >= depth or (drain and pipeline.window):
                    record = pipeline.apply_oldest()
                    trainer.history.append(record)
                    if on_step is not None:
                        on_step(record)
                if (step + 1) % every == 0:
                    trainer.take_snapshot()
                if last_of_epoch and trainer.evaluates(epoch):
                    evaluation = EvalRecord(step + 1, epoch, trainer.evaluate_split())
                    trainer.evaluations.append(evaluation)
                    if on_eval is not None:
                        on_eval(evaluation)
        finally:
            for flight in pipeline.window:  # a refused step: the later ones are moot
                flight.reply.cancel()
    trainer.most_in_flight = pipeline.most_in_flight
    result = TrainResult(
        steps=len(schedule), history=list(trainer.history), evaluations=list(trainer.evaluations)
    )
    result.wall_seconds = time.perf_counter() - started
    return result
