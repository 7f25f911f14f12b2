"""Forward FLOPs of a staged model, counted layer by layer (for the fleet reports).

Counts multiply-adds of convolutions and linear layers (2 FLOPs each), which
dominate these models; activations and pooling are ignored. Training one
sample costs about 3x its forward pass (forward, input gradients, weight
gradients), the usual rule of thumb.
"""

from __future__ import annotations

from math import prod

import torch
from torch import nn

from splitkd.models import zoo
from splitkd.models.spec import ModelSpec

TRAIN_FORWARD_RATIO = 3


def forward_flops(spec: ModelSpec, start: int = 0, stop: int | None = None) -> int:
    """FLOPs of one sample through stages ``[start, stop)``."""
    model = zoo.build(spec)
    stop = len(model.stages) if stop is None else stop
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            kernel = prod(module.kernel_size) * module.in_channels // module.groups
            total += 2 * kernel * output[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        x = model.run(torch.zeros((1, *spec.input_shape)), 0, start)
        model.run(x, start, stop)
    for hook in hooks:
        hook.remove()
    return total


def parameter_bytes(spec: ModelSpec) -> int:
    """Storage of the float32 weights."""
    return 4 * zoo.parameter_count(spec)
