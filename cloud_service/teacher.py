"""The teacher: trained at start-up on the cloud's presumed data, or loaded from a file.

Checkpoints are safetensors files (no pickle) whose metadata carries the
architecture spec, so a file a user hands us can only ever be weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from splitkd.data import load_dataset
from splitkd.data.partition import DEFAULT_PRESUMED_FRACTION, cloud_split
from splitkd.errors import FailedPrecondition, InvalidArgument
from splitkd.hyper import Hyperparameters
from splitkd.models import normalize, zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel, count_parameters
from splitkd.signature import DatasetSignature
from splitkd.training import accuracy_of, predict, train_supervised

log = logging.getLogger(__name__)

TEACHER_HYPER = Hyperparameters(epochs=40, learning_rate=0.001, batch_size=32)


@dataclass
class Teacher:
    spec: ModelSpec
    model: StagedModel
    accuracy: float | None = None
    data_name: str = ""

    @property
    def signature(self) -> DatasetSignature:
        return self.spec.signature

    @property
    def parameters(self) -> int:
        return count_parameters(self.model)

    def check_serves(self, signature: DatasetSignature) -> None:
        """Refuse an edge whose data this teacher was not built for."""
        mine = self.signature
        if signature.input_shape != mine.input_shape or signature.num_classes != mine.num_classes:
            raise FailedPrecondition(
                f"this cloud's teacher serves {mine.describe()}, but the edge's data is "
                f"{signature.describe()}: start the cloud with a teacher for that data (--teacher-data)"
            )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        metadata = {
            "family": self.spec.family,
            "spec": self.spec.to_json(),
            "accuracy": str(self.accuracy or ""),
        }
        save_file(state, str(tmp), metadata=metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Teacher:
        if not path.is_file():
            raise InvalidArgument(f"teacher checkpoint {path} does not exist")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidArgument(
                f"{path} is not a safetensors teacher checkpoint ({exc})"
            ) from exc
        if "family" not in metadata or "spec" not in metadata:
            raise InvalidArgument(f"{path} has no splitkd architecture metadata (family, spec)")
        spec = ModelSpec.from_json(metadata["family"], metadata["spec"])
        model = zoo.build(spec)
        _identity_stats_if_older(path, model.state_dict(), state)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InvalidArgument(
                f"{path}: weights do not match the spec {spec.describe()}"
            ) from exc
        model.eval()
        accuracy = float(metadata["accuracy"]) if metadata.get("accuracy") else None
        return cls(spec, model, accuracy, path.stem)


def _identity_stats_if_older(
    path: Path, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> None:
    """A file saved before models standardised their inputs: it was trained on raw ones."""
    missing = set(expected) - set(state)
    if missing and all(k.endswith((f".{normalize.MEAN}", f".{normalize.STD}")) for k in missing):
        log.warning("%s has no input statistics (an older file): it takes inputs as they are", path)
        state.update({k: expected[k] for k in missing})


def train_teacher(
    data_spec: str,
    *,
    presumed_fraction: float = DEFAULT_PRESUMED_FRACTION,
    hyper: Hyperparameters = TEACHER_HYPER,
    spec: ModelSpec | None = None,
) -> Teacher:
    """Train the default teacher for ``data_spec`` on the cloud's presumed part of it."""
    dataset = load_dataset(data_spec)
    split = cloud_split(dataset, presumed_fraction)
    spec = spec or zoo.default_teacher(dataset.signature)
    log.info(
        "training teacher %s (%d parameters) on %d presumed samples of %s",
        spec.describe(),
        zoo.parameter_count(spec),
        len(split.train),
        data_spec,
    )
    model = train_supervised(spec, split.train, hyper)
    accuracy = accuracy_of(predict(model, split.heldout.x), split.heldout.y)
    log.info("teacher accuracy on its held-out split: %.4f", accuracy)
    with torch.no_grad():
        model.eval()
    return Teacher(spec, model, accuracy, dataset.signature.name)
