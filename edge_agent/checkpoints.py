"""The edge's training checkpoints on disk, so that a device that reboots resumes.

Layout: ``FOLDER/session.json`` (which session, against which cloud, on which
data) and ``FOLDER/step-<n>.safetensors`` (head + optimizer at step n; see
``splitkd.checkpoint``). A finished run clears the folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from splitkd import checkpoint
from splitkd.errors import SplitKDError

log = logging.getLogger(__name__)


class EdgeCheckpoints:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def start(self, identity: dict[str, Any]) -> None:
        """A new session: forget any older one, remember this one."""
        self.clear()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".session.json.tmp"
        tmp.write_text(json.dumps(identity, indent=2))
        os.replace(tmp, self.folder / "session.json")

    def session(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.folder / "session.json").read_text())
            return data
        except (OSError, ValueError):
            return None

    def save_state(self, state: checkpoint.TrainingState) -> None:
        if not (self.folder / "session.json").exists():
            return  # no session to resume (e.g. cleared after finishing)
        checkpoint.write(checkpoint.step_path(self.folder, state.step), state)
        checkpoint.prune(self.folder)

    def states(self) -> dict[int, checkpoint.TrainingState]:
        states = {}
        for step in checkpoint.available_steps(self.folder):
            try:
                states[step] = checkpoint.read(checkpoint.step_path(self.folder, step))
            except SplitKDError as exc:  # a torn or foreign file: skip it, keep the rest
                log.warning("ignoring checkpoint of step %d: %s", step, exc)
        return states

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
