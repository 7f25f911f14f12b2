"""The edge's local model directory: verified ONNX students, one folder per version.

Layout: ``ROOT/NAME/VERSION/{model.onnx,metadata.json}`` and ``ROOT/CURRENT.json``
naming the version that ``serve`` and ``predict`` use. No torch needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeError
from splitkd.atomic import move_atomic, write_json_atomic

DEFAULT_MODEL_DIR = "~/.local/share/splitkd/models"
# The cloud registry's rule for model names (cloud_service/registry.py): no separator,
# no leading dot, so a name cannot climb out of the model directory.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_VERSION = 1_000_000
PREVIOUS_FILE = "PREVIOUS.json"


def check_model_id(name: object, version: object) -> tuple[str, int]:
    """A model name and version from the cloud (or CURRENT.json), refused before any path is built."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EdgeError(
            f"refusing model name {str(name)[:80]!r}: 1-128 letters, digits, '.', '_' or '-'"
        )
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise EdgeError(f"refusing model version {str(version)[:40]!r}: an integer from 1")
    return name, version


def default_model_dir() -> Path:
    base = os.environ.get("SPLITKD_MODEL_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) / "splitkd" / "models") if xdg else Path(DEFAULT_MODEL_DIR).expanduser()


def default_checkpoint_dir(device_id: str) -> Path:
    """Training state is state, not data: XDG's state directory, one folder per device id."""
    base = os.environ.get("SPLITKD_CHECKPOINT_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    root = Path(xdg) if xdg else Path("~/.local/state").expanduser()
    return root / "splitkd" / device_id


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LocalModel:
    name: str
    version: int
    path: Path
    metadata: dict[str, Any]


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, name: str, version: int) -> Path:
        name, version = check_model_id(name, version)
        return self.root / name / str(version)

    def download_path(self, name: str, version: int) -> Path:
        """Where a download lands before it is verified and installed."""
        name, version = check_model_id(name, version)
        return self.root / f".{name}-{version}.download"

    def install(
        self,
        name: str,
        version: int,
        onnx_file: Path,
        metadata: dict[str, Any],
        *,
        make_current: bool = True,
    ) -> LocalModel:
        """Move a downloaded file in, after checking its SHA-256; make it current unless told not to
        (adapt installs a candidate beside the served model and switches only if it is better)."""
        folder = self.folder(name, version)
        check_metadata(metadata, f"model {name} v{version}")
        expected = str(metadata.get("sha256", ""))
        actual = sha256_of(onnx_file)
        if not expected or actual != expected:
            raise EdgeError(
                f"model {name} v{version}: SHA-256 {actual[:12]}… does not match {expected[:12] or 'nothing'}…"
            )
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "model.onnx"
        move_atomic(onnx_file, target)
        write_json_atomic(folder / "metadata.json", metadata)
        if make_current:
            self._set_current(name, version)
        return LocalModel(name, version, target, metadata)

    def switch(self, name: str, version: int) -> LocalModel:
        """Serve an installed, verified version; the one served until now becomes the previous.

        Both pointers are atomic files and CURRENT.json is written last: a device that
        dies at any moment comes back on a complete model, the old one or the new one.
        """
        model = self.load(name, version)
        try:
            served = self.current()
            write_json_atomic(
                self.root / PREVIOUS_FILE, {"name": served.name, "version": served.version}
            )
        except EdgeError:
            pass  # nothing served yet (or a damaged pointer): nothing to roll back to
        self._set_current(name, version)
        return model

    def previous(self) -> LocalModel:
        pointer = self.root / PREVIOUS_FILE
        try:
            raw = json.loads(pointer.read_text())
            name, version = check_model_id(raw["name"], raw["version"])
        except FileNotFoundError:
            raise EdgeError(f"no previous model in {self.root}: nothing to roll back to") from None
        except (OSError, ValueError, KeyError, TypeError, EdgeError) as exc:
            raise EdgeError(f"{pointer} is damaged ({exc})") from None
        return self.load(name, version)

    def rollback(self) -> LocalModel:
        """Serve the previous version again (the current one becomes the previous)."""
        previous = self.previous()
        return self.switch(previous.name, previous.version)

    def _set_current(self, name: str, version: int) -> None:
        # Atomic and durable: serve never reads half a pointer, a power cut leaves old or new.
        write_json_atomic(self.root / "CURRENT.json", {"name": name, "version": version})

    def current(self) -> LocalModel:
        pointer = self.root / "CURRENT.json"
        if not pointer.is_file():
            raise EdgeError(
                f"no model in {self.root}: run 'splitkd-edge train' or 'splitkd-edge pull' first"
            )
        try:
            raw = json.loads(pointer.read_text())
            name, version = check_model_id(raw["name"], raw["version"])
        except (OSError, ValueError, KeyError, TypeError, EdgeError) as exc:
            raise EdgeError(f"{pointer} is damaged ({exc}); pull the model again") from None
        return self.load(name, version)

    def load(self, name: str, version: int) -> LocalModel:
        folder = self.folder(name, version)
        path = folder / "model.onnx"
        if not path.is_file():
            raise EdgeError(f"model {name} v{version} is not in {self.root}")
        metadata = _read_metadata(folder / "metadata.json")
        if sha256_of(path) != metadata.get("sha256"):
            raise EdgeError(
                f"model {name} v{version} in {folder} is corrupted (SHA-256 mismatch); pull it again"
            )
        return LocalModel(name, version, path, metadata)

    def pointer_mtime(self) -> float:
        try:
            return (self.root / "CURRENT.json").stat().st_mtime
        except FileNotFoundError:
            return 0.0


def check_metadata(metadata: object, where: str) -> dict[str, Any]:
    """Metadata that inference can rely on (an object with a positive ``input_shape``)."""
    shape = metadata.get("input_shape") if isinstance(metadata, dict) else None
    if not (
        isinstance(metadata, dict)
        and isinstance(shape, list)
        and shape
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise EdgeError(
            f"{where}: model metadata without a valid input_shape ({str(shape)[:40]}); "
            "pull the model again"
        )
    return metadata


def _read_metadata(path: Path) -> dict[str, Any]:
    """A model's metadata.json, or one clear error when it is missing or damaged."""
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeError(f"{path} is missing or damaged ({exc}); pull the model again") from None
    return check_metadata(metadata, str(path))
