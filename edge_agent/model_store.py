"""The edge's local model directory: verified ONNX students, one folder per version.

Layout: ``ROOT/NAME/VERSION/{model.onnx,metadata.json}`` and ``ROOT/CURRENT.json``
naming the version that ``serve`` and ``predict`` use. No torch needed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeError

DEFAULT_MODEL_DIR = "~/.local/share/splitkd/models"


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
        return self.root / name / str(version)

    def install(
        self, name: str, version: int, onnx_file: Path, metadata: dict[str, Any]
    ) -> LocalModel:
        """Move a downloaded file in, after checking its SHA-256; make it current."""
        expected = str(metadata.get("sha256", ""))
        actual = sha256_of(onnx_file)
        if not expected or actual != expected:
            raise EdgeError(
                f"model {name} v{version}: SHA-256 {actual[:12]}… does not match {expected[:12] or 'nothing'}…"
            )
        folder = self.folder(name, version)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "model.onnx"
        onnx_file.replace(target)
        (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
        self._set_current(name, version)
        return LocalModel(name, version, target, metadata)

    def _set_current(self, name: str, version: int) -> None:
        tmp = self.root / "CURRENT.json.tmp"
        tmp.write_text(json.dumps({"name": name, "version": version}))
        tmp.replace(self.root / "CURRENT.json")  # atomic: serve never reads half a pointer

    def current(self) -> LocalModel:
        pointer = self.root / "CURRENT.json"
        if not pointer.is_file():
            raise EdgeError(
                f"no model in {self.root}: run 'splitkd-edge train' or 'splitkd-edge pull' first"
            )
        try:
            raw = json.loads(pointer.read_text())
            return self.load(str(raw["name"]), int(raw["version"]))
        except (ValueError, KeyError) as exc:
            raise EdgeError(f"{pointer} is damaged ({exc}); pull the model again") from exc

    def load(self, name: str, version: int) -> LocalModel:
        folder = self.folder(name, version)
        path = folder / "model.onnx"
        if not path.is_file():
            raise EdgeError(f"model {name} v{version} is not in {self.root}")
        metadata = json.loads((folder / "metadata.json").read_text())
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
