"""Output folders a tool may clean: only those splitkd made itself.

A benchmark or the testbed clears what its last run left in its ``--out``
folder before a new run. That folder is the user's choice, so it may hold
files splitkd never wrote (``--out ~/results``). A folder is splitkd's when it
was new or empty when first claimed: claiming it leaves a marker file, and a
later run cleans only inside a folder that carries the marker. Anything else
is refused with one line naming the folder, and nothing is deleted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from splitkd.errors import FailedPrecondition

MARKER = ".splitkd-output"


def claim(folder: Path, tool: str) -> Path:
    """Make ``folder`` this tool's output folder, or refuse if it holds others' files."""
    marker = folder / MARKER
    if folder.is_dir() and not marker.exists() and any(folder.iterdir()):
        raise FailedPrecondition(
            f"{folder} already holds files splitkd did not write; {tool} writes and cleans "
            "its output folder, so give it a new or empty one (--out)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(f"written by {tool}: splitkd may clean this folder on its next run\n")
    return folder


def clear(path: Path, owner: Path) -> None:
    """Delete ``path`` (a file or folder) inside ``owner``, a folder :func:`claim` made."""
    if not (owner / MARKER).exists():
        raise FailedPrecondition(f"{owner} is not an output folder splitkd made; not cleaning it")
    # Where the entry itself lives (a symlink is judged by its place, never its target).
    home, parent = owner.resolve(), path.parent.resolve()
    if parent != home and home not in parent.parents:
        raise FailedPrecondition(f"{path} is outside the output folder {owner}; not deleting it")
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
