"""Training state on disk: model part + optimizer + step, atomically, without pickle.

A checkpoint is one safetensors file: the model tensors under ``model.*``,
the optimizer's per-parameter tensors under ``optim.<index>.<key>``, and in
the metadata the step and the optimizer's hyperparameters as JSON. Writing
goes to a temporary file that is fsynced and renamed over the old one, so a
crash leaves either the previous checkpoint or the new one, never half.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from splitkd.atomic import fsync_directory
from splitkd.errors import InvalidArgument

KEEP_CHECKPOINTS = 3


@dataclass
class TrainingState:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict
    meta: dict[str, str]


def copy_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of an optimizer state_dict (optimizers update their tensors in place)."""
    return {
        "state": {
            index: {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                for k, v in entry.items()
            }
            for index, entry in state["state"].items()
        },
        "param_groups": json.loads(json.dumps(state["param_groups"])),
    }


def snapshot(
    step: int, model: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, **meta: str
) -> TrainingState:
    """A deep copy of the state now (the live tensors keep changing)."""
    return TrainingState(
        step,
        {k: v.detach().clone() for k, v in model.items()},
        copy_optimizer_state(optimizer.state_dict()),
        dict(meta),
    )


def to_bytes(state: TrainingState) -> bytes:
    """The checkpoint as one safetensors blob (what a file or an object store holds)."""
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.contiguous() for k, v in state.model.items()
    }
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state.optimizer["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {
        **state.meta,
        "step": str(state.step),
        "param_groups": json.dumps(state.optimizer["param_groups"]),
        "optim_scalars": json.dumps(scalars),
    }
    return save(tensors, metadata=metadata)


def write(path: Path, state: TrainingState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(to_bytes(state))
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)  # the rename itself must reach the disk too


def read(path: Path) -> TrainingState:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{path} is not a splitkd training checkpoint ({exc})") from exc
    return from_bytes(data, str(path))


def from_bytes(data: bytes, what: str = "the checkpoint") -> TrainingState:
    try:
        tensors = load(data)
        # The header: 8 bytes of length, then JSON whose __metadata__ holds our strings.
        size = int.from_bytes(data[:8], "little")
        metadata = dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})
        step = int(metadata.pop("step"))
        param_groups = json.loads(metadata.pop("param_groups"))
        scalars = json.loads(metadata.pop("optim_scalars", "{}"))
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidArgument(f"{what} is not a splitkd training checkpoint ({exc})") from exc
    model: dict[str, torch.Tensor] = {}
    optim_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("model."):
            model[name[len("model.") :]] = value
        elif name.startswith("optim."):
            _, index, key = name.split(".", 2)
            optim_state.setdefault(int(index), {})[key] = value
    for index, entry in scalars.items():
        optim_state.setdefault(int(index), {}).update(entry)
    return TrainingState(
        step, model, {"state": optim_state, "param_groups": param_groups}, metadata
    )


def step_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.safetensors"


def available_steps(folder: Path) -> list[int]:
    steps = []
    for path in folder.glob("step-*.safetensors"):
        try:
            steps.append(int(path.stem.split("-", 1)[1]))
        except ValueError:
            continue
    return sorted(steps)


def prune(folder: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep step 0 (the common ground of last resort) and the newest ``keep``."""
    steps = available_steps(folder)
    for step in steps[:-keep]:
        if step != 0:
            step_path(folder, step).unlink(missing_ok=True)
