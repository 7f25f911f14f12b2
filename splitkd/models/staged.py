"""A model as an ordered list of stages, so that any cut point has a name."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from splitkd.errors import InvalidArgument
from splitkd.models.normalize import check_std


class StagedModel(nn.Module):
    """``stages[0] -> stages[1] -> ... -> logits``; state keys are ``stages.{i}.*``."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def part(self, start: int, stop: int) -> nn.Sequential:
        """Stages ``[start, stop)`` as a module sharing parameters with this model."""
        return nn.Sequential(*self.stages[start:stop])

    def part_state(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Named numpy copies of the parameters and buffers of stages ``[start, stop)``."""
        keep = tuple(f"stages.{i}." for i in range(start, stop))
        return {
            k: v.detach().cpu().numpy().copy()
            for k, v in self.state_dict().items()
            if k.startswith(keep)
        }

    def part_shapes(self, start: int, stop: int) -> dict[str, tuple[int, ...]]:
        keep = tuple(f"stages.{i}." for i in range(start, stop))
        return {k: tuple(v.shape) for k, v in self.state_dict().items() if k.startswith(keep)}

    def load_part(self, start: int, stop: int, state: Mapping[str, np.ndarray]) -> None:
        """Load exactly the tensors of stages ``[start, stop)``; anything else is refused."""
        expected = self.part_shapes(start, stop)
        if set(state) != set(expected):
            raise InvalidArgument(
                f"weights for stages [{start}, {stop}) must name {sorted(expected)}, got {sorted(state)}"
            )
        for name, value in state.items():  # all checked before any is loaded
            if tuple(value.shape) != expected[name]:
                raise InvalidArgument(
                    f"weight {name} has shape {list(value.shape)}, expected {list(expected[name])}"
                )
            check_std(name, value)
        own = self.state_dict()
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(torch.from_numpy(np.array(value, dtype=np.float32)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
