"""Versioned model registry on disk: ``ROOT/NAME/VERSION/{model.onnx,metadata.json}``."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from splitkd.errors import InvalidArgument, NotFound

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return name


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def publish(self, name: str, onnx_bytes: bytes, **meta: object) -> ModelRecord:
        check_name(name)
        with self._lock:
            versions = self._versions(name)
            version = (versions[-1] + 1) if versions else 1
            folder = self.root / name / str(version)
            tmp = self.root / name / f".{version}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "model.onnx").write_bytes(onnx_bytes)
            record = ModelRecord(
                name=name,
                version=version,
                sha256=hashlib.sha256(onnx_bytes).hexdigest(),
                size_bytes=len(onnx_bytes),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                **meta,  # type: ignore[arg-type]
            )
            (tmp / "metadata.json").write_text(json.dumps(record.to_dict(), indent=2))
            # The rename is atomic: a reader sees a whole version or none.
            tmp.rename(folder)
            return record

    def _versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def versions(self, name: str) -> list[ModelRecord]:
        return [self.get(name, v) for v in self._versions(check_name(name))]

    def get(self, name: str, version: int = 0) -> ModelRecord:
        check_name(name)
        versions = self._versions(name)
        if not versions:
            raise NotFound(f"no model named {name!r}")
        if version == 0:
            version = versions[-1]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version} (versions: {versions})")
        raw = json.loads((self.root / name / str(version) / "metadata.json").read_text())
        return ModelRecord(**raw)

    def path(self, name: str, version: int = 0) -> Path:
        record = self.get(name, version)
        return self.root / name / str(record.version) / "model.onnx"
