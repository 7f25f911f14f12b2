"""Teacher micro-batching (issue 13): concurrent steps share one pass, and nothing changes."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from cloud_service.batcher import TeacherBatcher
from tests.support import make_teacher, wait_for

TEACHER = make_teacher().model
CUT = 1


def activations(seed: int, batch: int = 16) -> np.ndarray:
    from splitkd.models import zoo

    shape = zoo.activation_shape(make_teacher().spec, CUT)
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def alone(x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return TEACHER.run(torch.from_numpy(x), CUT, len(TEACHER.stages))


class Gated:
    """The teacher, whose first pass waits until the test opens the gate."""

    def __init__(self) -> None:
        self.stages = TEACHER.stages
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batch_sizes: list[int] = []

    def run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        self.batch_sizes.append(len(x))
        self.started.set()
        self.gate.wait(60)
        return TEACHER.run(x, start, stop)


def test_steps_that_arrive_while_a_pass_runs_share_the_next_one() -> None:
    batcher = TeacherBatcher(window_seconds=0.0)
    teacher = Gated()
    inputs = [activations(i) for i in range(8)]
    results: dict[int, torch.Tensor] = {}

    def step(i: int) -> None:
        results[i] = batcher.run(teacher, CUT, inputs[i])[0]  # type: ignore[arg-type]

    threads = [threading.Thread(target=step, args=(0,))]
    threads[0].start()
    assert teacher.started.wait(60)
    threads += [threading.Thread(target=step, args=(i,)) for i in range(1, 8)]
    for thread in threads[1:]:
        thread.start()
    wait_for(
        "seven steps queued", lambda: sum(len(q.waiting) for q in batcher._queues.values()) == 7
    )
    teacher.gate.set()
    for thread in threads:
        thread.join(60)
    assert teacher.batch_sizes == [16, 7 * 16]  # one pass, then one for the seven together
    assert (batcher.batches, batcher.requests) == (2, 8)
    for i, x in enumerate(inputs):
        torch.testing.assert_close(results[i], alone(x), rtol=1e-5, atol=1e-5)


def test_a_lone_step_is_computed_exactly_as_without_batching() -> None:
    x = activations(3)
    logits, _ = TeacherBatcher().run(TEACHER, CUT, x)
    assert torch.equal(logits, alone(x))
    off, _ = TeacherBatcher(enabled=False).run(TEACHER, CUT, x)
    assert torch.equal(off, alone(x))


def test_a_failing_pass_fails_every_step_in_it_and_the_next_pass_runs() -> None:
    batcher = TeacherBatcher()

    class Broken:
        stages = TEACHER.stages

        def run(self, *args: Any) -> torch.Tensor:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.run(Broken(), CUT, activations(0))  # type: ignore[arg-type]
    logits, _ = batcher.run(TEACHER, CUT, activations(1))
    assert logits.shape[0] == 16
