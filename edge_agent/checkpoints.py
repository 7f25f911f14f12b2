"""The edge's training checkpoints on disk, so that a device that reboots resumes.

Layout: ``FOLDER/session.json`` (which session, against which cloud, on which
data) and ``FOLDER/step-<n>.safetensors`` (head + optimizer at step n, and the
run's totals so far; see ``splitkd.checkpoint``). A finished run deletes them.

splitkd deletes only what it wrote: it keeps its files in a folder it owns,
marked by ``.splitkd-checkpoints``. A folder given by the user that already
holds other files (a home directory, the model directory) is not taken over:
the checkpoints go to its subfolder ``splitkd-checkpoints`` instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitkd import checkpoint
from splitkd.atomic import write_bytes_atomic, write_json_atomic
from splitkd.errors import SplitKDError

log = logging.getLogger(__name__)

MARKER = ".splitkd-checkpoints"
SUBFOLDER = "splitkd-checkpoints"
SESSION = "session.json"
TOTALS_KEY = "edge_totals"
# Everything this module and splitkd.checkpoint write, temporary files included.
_OURS = re.compile(
    r"^(session\.json|step-\d{9}\.safetensors|\.(session\.json|step-\d{9}\.safetensors)\..*tmp)$"
)


def _is_ours(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def owned_folder(requested: Path, avoid: Path | None = None) -> Path:
    """The folder to keep checkpoints in: ``requested`` if splitkd may own it, else its subfolder.

    ``avoid`` is a folder that belongs to something else even while empty (the model directory).
    """
    clash = avoid is not None and requested.resolve() == avoid.resolve()
    if not clash and (
        not requested.exists() or _is_ours(requested) or not any(requested.iterdir())
    ):
        return requested
    sub = requested / SUBFOLDER
    if sub.exists() and not _is_ours(sub) and any(sub.iterdir()):
        raise SplitKDError(
            f"--checkpoint-dir {requested} holds other files, and so does {sub}: "
            "give splitkd a folder of its own"
        )
    log.info("%s holds other files; keeping checkpoints in %s", requested, sub)
    return sub


class EdgeCheckpoints:
    def __init__(self, folder: Path, avoid: Path | None = None) -> None:
        self.folder = owned_folder(folder, avoid)
        # This run's totals so far (bytes, joules, seconds), saved with each checkpoint
        # so that the report of a run resumed after a restart counts every process.
        self.totals: Callable[[], dict[str, float]] | None = None
        # What the earlier processes spent, read from the checkpoints by ``states``.
        self.earlier: dict[str, float] = {}

    def _own(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not _is_ours(self.folder):
            write_bytes_atomic(
                self.folder / MARKER,
                b"splitkd-edge training checkpoints; splitkd deletes only its own files here\n",
            )

    def start(self, identity: dict[str, Any]) -> None:
        """A new session: forget any older one, remember this one."""
        self.clear()
        self._own()
        write_json_atomic(self.folder / SESSION, identity)

    def session(self) -> dict[str, Any] | None:
        if not _is_ours(self.folder):
            return None
        try:
            data: dict[str, Any] = json.loads((self.folder / SESSION).read_text())
            return data
        except (OSError, ValueError):
            return None

    def save_state(self, state: checkpoint.TrainingState) -> None:
        if not (self.folder / SESSION).exists():
            return  # no session to resume (e.g. cleared after finishing)
        if self.totals is not None:
            state.meta[TOTALS_KEY] = json.dumps(self.totals())
        checkpoint.write(checkpoint.step_path(self.folder, state.step), state)
        checkpoint.prune(self.folder)

    def states(self) -> dict[int, checkpoint.TrainingState]:
        states = {}
        for step in checkpoint.available_steps(self.folder):
            try:
                states[step] = checkpoint.read(checkpoint.step_path(self.folder, step))
            except SplitKDError as exc:  # a torn or foreign file: skip it, keep the rest
                log.warning("ignoring checkpoint of step %d: %s", step, exc)
        self.earlier = saved_totals(states)
        return states

    def clear(self) -> None:
        """Delete the files splitkd wrote here, and nothing else."""
        if not self.folder.is_dir() or not _is_ours(self.folder):
            return
        for path in self.folder.iterdir():
            if _OURS.fullmatch(path.name) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def saved_totals(states: dict[int, checkpoint.TrainingState]) -> dict[str, float]:
    """The totals of the newest checkpoint: what the earlier processes of this run spent.

    The newest, not the one both sides resume from: work done after the common
    step was spent too. Work after the newest checkpoint is lost with the process.
    """
    for step in sorted(states, reverse=True):
        raw = states[step].meta.get(TOTALS_KEY)
        if raw is None:
            continue
        try:
            totals = json.loads(raw)
            return {str(k): float(v) for k, v in totals.items()}
        except (ValueError, TypeError, AttributeError):
            log.warning("ignoring unreadable totals in the checkpoint of step %d", step)
    return {}
