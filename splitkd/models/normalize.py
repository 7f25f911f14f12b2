"""Input standardisation as the first operation of stage 0.

Users' data comes at its own scales (a sensor in millivolts beside a count in
thousands); a small student trained on such raw features learns poorly. So every
model standardises its raw inputs itself: ``(x - input_mean) / input_std`` with
fixed buffers (never trained) that belong to stage 0. The statistics are fitted
where the data is (the teacher's on the cloud's data, the student's on the
device's training split) and travel with the weights: in head weights, in
checkpoints, and as constants in the exported ONNX model, which therefore takes
raw inputs.

Statistics are per feature for tabular data (rank-1 inputs) and per channel for
sequences and images, computed in float64. A feature whose standard deviation is
below ``RELATIVE_FLOOR`` times its mean's magnitude (or below ``ABSOLUTE_FLOOR``)
is constant on the data: it is centred and divided by 1, never by a near-zero
number that would blow up an unseen value.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from splitkd.errors import InvalidArgument

MEAN = "input_mean"
STD = "input_std"
# ~10 float32 ulps: below this a feature's spread is rounding noise, not signal.
RELATIVE_FLOOR = 1e-6
ABSOLUTE_FLOOR = 1e-12


def stats_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per feature for ``[F]``, per channel (broadcast over positions) for ``[C, ...]``."""
    return (input_shape[0],) + (1,) * (len(input_shape) - 1)


class InputStage(nn.Sequential):
    """Stage 0: standardise raw inputs with fixed buffers, then the stage's layers.

    A ``Sequential`` subclass so that the layers keep their state names
    (``stages.0.0.weight``); the buffers add ``stages.0.input_mean`` and
    ``stages.0.input_std``.
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, input_shape: tuple[int, ...], *layers: nn.Module) -> None:
        super().__init__(*layers)
        shape = stats_shape(input_shape)
        self.register_buffer(MEAN, torch.zeros(shape))
        self.register_buffer(STD, torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.input_mean) / self.input_std)


def fit_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (floored) std of samples ``x`` of shape ``[N, *input_shape]``."""
    if len(x) == 0:
        raise InvalidArgument("cannot fit input statistics on no samples")
    values = x.astype(np.float64)
    axes = (0,) if values.ndim == 2 else (0, *range(2, values.ndim))
    mean = values.mean(axis=axes, keepdims=True)[0]
    std = values.std(axis=axes, keepdims=True)[0]
    floor = np.maximum(RELATIVE_FLOOR * np.abs(mean), ABSOLUTE_FLOOR)
    std = np.where(std > floor, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def input_stage(model: nn.Module) -> InputStage | None:
    """The model's input stage, if it has one (a whole model or a head)."""
    return next((m for m in model.modules() if isinstance(m, InputStage)), None)


def token_vocabulary(model: nn.Module) -> int:
    """The vocabulary of a model whose inputs are token ids (a transformer's); 0 otherwise."""
    for module in model.modules():
        if getattr(module, "takes_token_ids", False):
            return int(getattr(module, "vocabulary", 0))
    return 0


def fit_inputs(model: nn.Module, x: np.ndarray) -> None:
    """Fit ``model``'s input statistics on samples ``x`` (the data it will train on)."""
    stage = input_stage(model)
    if stage is None and token_vocabulary(model):
        return  # token ids are categories: nothing to standardise
    if stage is None:
        raise InvalidArgument("this model has no input stage to fit")
    mean, std = fit_stats(x)
    with torch.no_grad():
        stage.input_mean.copy_(torch.from_numpy(mean).reshape(stage.input_mean.shape))
        stage.input_std.copy_(torch.from_numpy(std).reshape(stage.input_std.shape))


def check_std(name: str, value: np.ndarray) -> None:
    """Refuse a received ``input_std`` that would divide by zero or flip signs."""
    if name.endswith(f".{STD}") and not bool(np.all(value > 0)):
        raise InvalidArgument(f"weight {name} must be > 0 everywhere (a standard deviation)")


def typical_inputs(
    model: nn.Module, input_shape: tuple[int, ...], count: int, seed: int
) -> np.ndarray:
    """Random inputs at the scale the model expects (its raw-input statistics)."""
    vocabulary = token_vocabulary(model)
    if vocabulary:  # random token ids, held as float32 like every dataset's inputs
        ids = np.random.default_rng(seed).integers(0, vocabulary, (count, *input_shape))
        return ids.astype(np.float32)
    noise = np.random.default_rng(seed).standard_normal((count, *input_shape))
    stage = input_stage(model)
    if stage is None:
        return noise.astype(np.float32)
    mean, std = stage.input_mean.numpy(), stage.input_std.numpy()
    return (mean + std * noise).astype(np.float32)
