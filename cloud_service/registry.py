"""Versioned model registry on disk: ``ROOT/NAME/VERSION/{model.onnx,metadata.json}``.

Each model keeps its newest ``keep_versions`` versions; older ones are pruned
when a new one is published, deleting only the two files the registry wrote.
"Not found" answers never say which versions exist: with authentication on,
another device's model must look exactly like a model that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from splitkd import names
from splitkd.atomic import fsync_directory, write_bytes_atomic, write_json_atomic
from splitkd.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)
_FILES = ("model.onnx", "metadata.json")
# Enough to roll a device back a few trainings; a registry must not grow forever.
DEFAULT_KEEP_VERSIONS = 5
# Versions another replica may take between our look and our rename (shared folder).
_PUBLISH_ATTEMPTS = 20


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: int
    sha256: str
    size_bytes: int
    parameters: int
    max_abs_diff: float
    input_shape: list[int]
    num_classes: int
    created_at: str
    device_id: str = ""
    steps: int = 0
    cohort: str = ""  # a cohort's student: its members may download it
    teacher_version: int = 0  # the server model version the student was distilled from

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_name(name: str) -> str:
    if not names.is_model_name(name):
        shown = repr(name) if len(name) <= 128 else f"of {len(name)} characters"
        raise InvalidArgument(f"model name {shown} must be 1-128 letters, digits, '.', '_' or '-'")
    return name


def model_not_found(name: str, version: int) -> NotFound:
    """The one answer for a model or version that is missing, or not the caller's."""
    which = f" version {version}" if version else ""
    return NotFound(f"no model {name!r}{which} here")


class ModelRegistry:
    def __init__(self, root: Path, keep_versions: int = DEFAULT_KEEP_VERSIONS) -> None:
        """``keep_versions``: newest versions kept per model (0: keep all)."""
        if keep_versions < 0:
            raise InvalidArgument(f"keep versions must be >= 0 (0 = all), got {keep_versions}")
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions
        self._lock = threading.Lock()

    def publish(self, name: str, onnx_bytes: bytes, **meta: object) -> ModelRecord:
        check_name(name)
        with self._lock:
            # Replicas sharing this folder may publish at once: a version whose folder
            # another one renamed into place first is taken, so try the next.
            for _ in range(_PUBLISH_ATTEMPTS):
                record = self._publish_once(name, onnx_bytes, meta)
                if record is not None:
                    self._prune(name)
                    return record
        raise OSError(f"could not publish {name}: {_PUBLISH_ATTEMPTS} versions taken meanwhile")

    def _publish_once(
        self, name: str, onnx_bytes: bytes, meta: dict[str, object]
    ) -> ModelRecord | None:
        versions = self._versions(name)
        version = (versions[-1] + 1) if versions else 1
        folder = self.root / name / str(version)
        (self.root / name).mkdir(parents=True, exist_ok=True)
        # A name of its own: another process preparing the same version never writes in it.
        tmp = Path(tempfile.mkdtemp(dir=self.root / name, prefix=f".{version}.", suffix=".tmp"))
        write_bytes_atomic(tmp / "model.onnx", onnx_bytes)
        record = ModelRecord(
            name=name,
            version=version,
            sha256=hashlib.sha256(onnx_bytes).hexdigest(),
            size_bytes=len(onnx_bytes),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            **meta,  # type: ignore[arg-type]
        )
        write_json_atomic(tmp / "metadata.json", record.to_dict())
        try:
            # The rename is atomic: a reader sees a whole version or none.
            tmp.rename(folder)
        except OSError:
            if not folder.exists():
                raise
            for file in _FILES:
                (tmp / file).unlink(missing_ok=True)
            tmp.rmdir()
            return None
        fsync_directory(folder.parent)
        return record

    def _prune(self, name: str) -> None:
        """Delete versions older than the newest ``keep_versions`` (callers hold the lock)."""
        if not self.keep_versions:
            return
        for version in self._versions(name)[: -self.keep_versions]:
            folder = self.root / name / str(version)
            for file in _FILES:
                (folder / file).unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                log.warning(
                    "pruned %s v%d; kept %s for the files splitkd did not write",
                    name,
                    version,
                    folder,
                )

    def _versions(self, name: str) -> list[int]:
        """Published versions: a folder named by a number, with its metadata."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in folder.iterdir()
            if p.name.isdigit() and (p / "metadata.json").is_file()
        )

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and names.is_model_name(p.name)
        )

    def versions(self, name: str) -> list[ModelRecord]:
        return [self.get(name, v) for v in self._versions(check_name(name))]

    def get(self, name: str, version: int = 0) -> ModelRecord:
        check_name(name)
        versions = self._versions(name)
        if not versions or (version and version not in versions):
            raise model_not_found(name, version)
        version = version or versions[-1]
        raw = json.loads((self.root / name / str(version) / "metadata.json").read_text())
        return ModelRecord(**raw)

    def path(self, name: str, version: int = 0) -> Path:
        record = self.get(name, version)
        return self.root / name / str(record.version) / "model.onnx"
