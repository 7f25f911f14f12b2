"""The teacher: trained at start-up on the cloud's data, or loaded from a file.

Checkpoints are safetensors files (no pickle) whose metadata carries the
architecture spec, so a file a user hands us can only ever be weights.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from splitkd.atomic import write_bytes_atomic, write_json_atomic
from splitkd.data import load_dataset
from splitkd.data.partition import cloud_split, default_presumed_fraction
from splitkd.data.specs import DataError
from splitkd.errors import FailedPrecondition, InvalidArgument
from splitkd.hyper import Hyperparameters
from splitkd.models import normalize, zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel, count_parameters
from splitkd.signature import DatasetSignature
from splitkd.training import accuracy_of, predict, train_supervised

log = logging.getLogger(__name__)

TEACHER_HYPER = Hyperparameters(epochs=40, learning_rate=0.001, batch_size=32)
# A transformer on text: every window is 64 training tokens, so few epochs go far
# (make lm-demo trains it at start-up; README, "Language models").
LANGUAGE_TEACHER_HYPER = Hyperparameters(epochs=8, learning_rate=0.003, batch_size=32)


@dataclass
class Teacher:
    spec: ModelSpec
    model: StagedModel
    accuracy: float | None = None
    data_name: str = ""
    # Samples of its data used for what (train, heldout, set_aside, other_shards);
    # empty for a checkpoint saved before they were recorded.
    samples: dict[str, int] = field(default_factory=dict)
    # The server model can learn (reverse KD in federated cohorts): each update is
    # a new Teacher with the next version and a new model object, never an
    # in-place change, so a session keeps the frozen version it registered with.
    version: int = 1

    @property
    def signature(self) -> DatasetSignature:
        return self.spec.signature

    @property
    def parameters(self) -> int:
        return count_parameters(self.model)

    def check_serves(self, signature: DatasetSignature) -> None:
        """Refuse an edge whose data this teacher was not built for."""
        mine = self.signature
        if signature.input_shape != mine.input_shape:
            raise FailedPrecondition(
                f"this cloud's teacher serves {mine.describe()}, but the edge's data is "
                f"{signature.kind} {'x'.join(map(str, signature.input_shape))}: start the cloud "
                "with a teacher for that data (--teacher-data)"
            )
        # A device may see only some of the task's classes (the usual case in a fleet).
        if signature.num_classes > mine.num_classes:
            raise FailedPrecondition(
                f"this cloud's teacher serves {mine.num_classes} classes (labels 0.."
                f"{mine.num_classes - 1}), but the edge's labels go up to "
                f"{signature.num_classes - 1}: start the cloud with a teacher for that data"
            )

    def save(self, path: Path) -> None:
        """Durably: a cloud killed while saving leaves the old file or the new one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        """The safetensors file: weights, and the architecture in its metadata."""
        state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        metadata = {
            "family": self.spec.family,
            "spec": self.spec.to_json(),
            "accuracy": str(self.accuracy or ""),
            "samples": json.dumps(self.samples),
        }
        return bytes(save(state, metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> Teacher:
        if not path.is_file():
            raise InvalidArgument(f"teacher checkpoint {path} does not exist")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"{path} cannot be read ({exc})") from exc
        teacher = cls.from_bytes(raw, str(path))
        teacher.data_name = path.stem
        return teacher

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Teacher:
        """A teacher from a safetensors file's bytes (``where`` names it in errors)."""
        try:
            metadata = _metadata(raw)
            state = load(raw)
        except (SafetensorError, ValueError, TypeError) as exc:
            raise InvalidArgument(
                f"{where} is not a safetensors teacher checkpoint ({exc})"
            ) from exc
        if "family" not in metadata or "spec" not in metadata:
            raise InvalidArgument(f"{where} has no splitkd architecture metadata (family, spec)")
        spec = ModelSpec.from_json(metadata["family"], metadata["spec"])
        model = zoo.build(spec)
        _identity_stats_if_older(where, model.state_dict(), state)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InvalidArgument(
                f"{where}: weights do not match the spec {spec.describe()}"
            ) from exc
        model.eval()
        accuracy = float(metadata["accuracy"]) if metadata.get("accuracy") else None
        return cls(spec, model, accuracy, "", _samples(metadata.get("samples", "{}")))


def _metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (an 8-byte length, then a JSON header)."""
    size = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or size > len(raw) - 8:
        raise ValueError("truncated header")
    header = json.loads(raw[8 : 8 + size])
    metadata = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
    if not isinstance(metadata, dict):
        raise ValueError("malformed metadata")
    return {str(k): str(v) for k, v in metadata.items()}


def _samples(text: str) -> dict[str, int]:
    """The sample counts in a checkpoint's metadata; anything malformed reads as unknown."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int)}


def _identity_stats_if_older(
    path: Path | str, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> None:
    """A file saved before models standardised their inputs: it was trained on raw ones."""
    missing = set(expected) - set(state)
    if missing and all(k.endswith((f".{normalize.MEAN}", f".{normalize.STD}")) for k in missing):
        log.warning("%s has no input statistics (an older file): it takes inputs as they are", path)
        state.update({k: expected[k] for k in missing})


def train_teacher(
    data_spec: str,
    *,
    presumed_fraction: float | None = None,
    hyper: Hyperparameters | None = None,
    spec: ModelSpec | None = None,
) -> Teacher:
    """Train the default teacher for ``data_spec``: on all of a user's file (but its
    held-out part) unless ``presumed_fraction`` says which share the cloud keeps."""
    if presumed_fraction is None:
        presumed_fraction = default_presumed_fraction(data_spec)
    dataset = load_dataset(data_spec)
    if hyper is None:
        hyper = LANGUAGE_TEACHER_HYPER if dataset.signature.tokens else TEACHER_HYPER
    split = cloud_split(dataset, presumed_fraction)
    if len(np.unique(split.train.y)) < 2:
        raise DataError(f"{data_spec}: the teacher's training data holds fewer than 2 classes")
    spec = spec or zoo.default_teacher(dataset.signature)
    log.info(
        "training teacher %s (%d parameters) on %d samples of %s (%d held out, %d set aside "
        "for the edges)",
        spec.describe(),
        zoo.parameter_count(spec),
        len(split.train),
        data_spec,
        len(split.heldout),
        split.set_aside,
    )
    model = train_supervised(spec, split.train, hyper)
    accuracy = accuracy_of(predict(model, split.heldout.x), split.heldout.y)
    log.info("teacher accuracy on its held-out split: %.4f", accuracy)
    with torch.no_grad():
        model.eval()
    return Teacher(spec, model, accuracy, dataset.signature.name, split.sample_counts())


CURRENT_FILE = "CURRENT.json"


def read_current_version(folder: Path) -> int | None:
    """The version the pointer names, or None (no pointer yet, or a damaged one)."""
    try:
        value = json.loads((folder / CURRENT_FILE).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class TeacherVersions:
    """The server model's versions: the current one, and the ones sessions still use.

    Readers call ``current()`` (or ``get(version)``) and keep what they got;
    ``update`` swaps in a new version under a lock. Versions are kept on disk
    when ``folder`` is given, so a restarted cloud resumes at the same version
    and sessions checkpointed against an older one can still be restored.
    """

    def __init__(self, first: Teacher, folder: Path | None = None) -> None:
        self._lock = threading.Lock()
        self.folder = folder
        self._pointer_stamp: tuple[int, int] | None = None
        self._versions: dict[int, Teacher] = {first.version: first}
        # Each update's provenance (what made it), e.g. {"made_for": "cohort X round 3"}.
        self._provenance: dict[int, dict[str, object]] = {}
        self._current = first
        self.on_update: list[Callable[[Teacher], None]] = []
        if folder is not None:
            self._load_saved(first)

    def _load_saved(self, first: Teacher) -> None:
        assert self.folder is not None
        for path in sorted(self.folder.glob("v*.safetensors")):
            number = path.stem[1:]
            if not number.isdigit() or int(number) == first.version:
                continue
            saved = Teacher.load(path)
            if saved.spec != first.spec:
                log.warning("%s: another teacher architecture; not restored", path.name)
                continue
            saved.version, saved.data_name = int(number), first.data_name
            self._versions[saved.version] = saved
            self._provenance[saved.version] = _provenance(path.with_suffix(".json"))
        self._current = self._versions[max(self._versions)]
        pointed = read_current_version(self.folder)
        if pointed is not None and pointed in self._versions:
            # An update that died before its pointer was written is not current.
            self._current = self._versions[pointed]
        if self._current is not first:
            log.info("server model restored at version %d", self._current.version)

    def current(self) -> Teacher:
        with self._lock:
            self._follow_pointer()
            return self._current

    def _follow_pointer(self) -> None:
        """Take up a version ``splitkd-cloud teacher rollback`` pointed at while we run.

        One stat per call; the pointer is read only when its file changed. Callers
        hold ``self._lock``.
        """
        if self.folder is None:
            return
        try:
            stat = (self.folder / CURRENT_FILE).stat()
        except OSError:
            return
        # The pointer is replaced atomically, so a new write is a new inode even
        # within the file system's coarse mtime tick.
        stamp = (stat.st_ino, stat.st_mtime_ns)
        if stamp == self._pointer_stamp:
            return
        self._pointer_stamp = stamp
        pointed = read_current_version(self.folder)
        if pointed in self._versions and pointed != self._current.version:
            log.info("server model switched to version %d (pointer changed)", pointed)
            self._current = self._versions[pointed]

    def refresh(self) -> Teacher:
        """The current version after looking at the versions kept (replicas: the shared
        store, whatever the last look was; raises Unavailable when it does not answer)."""
        return self.current()

    def made_for(self, purpose: str) -> Teacher | None:
        """The version an update made for ``purpose`` (its provenance's ``made_for``), if
        any: a round that died after its server-model update reuses it, never learns twice."""
        with self._lock:
            for version, provenance in self._provenance.items():
                # Past the current version: an update that died before its pointer
                # was written, which does not count (the round learns again).
                if provenance.get("made_for") == purpose and version <= self._current.version:
                    return self._versions.get(version)
        return None

    def get(self, version: int) -> Teacher:
        with self._lock:
            if version not in self._versions:
                raise FailedPrecondition(
                    f"teacher version {version} is not available (have {sorted(self._versions)})"
                )
            return self._versions[version]

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._versions)

    def update(
        self,
        model: StagedModel,
        accuracy: float | None = None,
        provenance: dict[str, object] | None = None,
    ) -> Teacher:
        """Make ``model`` (a new object, never a live version's) the next version.

        On disk in this order: the weights, their provenance, then the pointer to
        the current version; a cloud killed before the pointer restarts on the old one.
        """
        model.eval()
        with self._lock:
            old = self._current
            number = max(self._versions) + 1  # past any version a dead update left behind
            new = Teacher(old.spec, model, accuracy, old.data_name, dict(old.samples), number)
            if self.folder is not None:
                if read_current_version(self.folder) is None:
                    # Name the serving version first, or a restart after a death between the
                    # weights and the pointer would take the half-made update for current.
                    self.folder.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(self.folder / CURRENT_FILE, {"version": old.version})
                new.save(self.folder / f"v{new.version}.safetensors")
                if provenance is not None:
                    write_json_atomic(self.folder / f"v{new.version}.json", provenance)
                write_json_atomic(self.folder / CURRENT_FILE, {"version": new.version})
            self._versions[new.version] = new
            self._provenance[new.version] = dict(provenance or {})
            self._current = new
        log.info("server model updated to version %d", new.version)
        for callback in self.on_update:
            callback(new)
        return new

    def rollback(self, version: int) -> Teacher:
        """Serve ``version`` again (a running cloud); on disk too when kept there."""
        with self._lock:
            if version not in self._versions:
                raise FailedPrecondition(
                    f"teacher version {version} is not available (have {sorted(self._versions)})"
                )
            self._current = self._versions[version]
            if self.folder is not None:
                write_json_atomic(self.folder / CURRENT_FILE, {"version": version})
        log.info("server model rolled back to version %d", version)
        return self._current


def _provenance(path: Path) -> dict[str, object]:
    """A version's provenance record; empty when there is none or it is damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def version_history(folder: Path) -> list[dict[str, object]]:
    """Every version kept in ``folder`` with its provenance, oldest first (for the CLI)."""
    current = read_current_version(folder)
    numbers = {1}
    for path in folder.glob("v*.safetensors"):
        if path.stem[1:].isdigit():
            numbers.add(int(path.stem[1:]))
    if current is None:
        current = max(numbers)
    rows: list[dict[str, object]] = []
    for number in sorted(numbers):
        provenance: dict[str, object] = {}
        record = folder / f"v{number}.json"
        if record.is_file():
            try:
                provenance = json.loads(record.read_text())
            except ValueError:
                provenance = {"damaged": str(record)}
        rows.append({"version": number, "current": number == current, **provenance})
    return rows


def rollback_on_disk(folder: Path, version: int) -> None:
    """Point ``folder``'s teacher at ``version`` (takes effect when the cloud starts)."""
    if version != 1 and not (folder / f"v{version}.safetensors").is_file():
        have = [row["version"] for row in version_history(folder)]
        raise FailedPrecondition(f"teacher version {version} is not kept here (have {have})")
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / CURRENT_FILE, {"version": version})
