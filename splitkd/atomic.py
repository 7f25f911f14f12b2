"""Writes that survive power loss: a file is either its old content or its new one.

An SD card loses what sits in the page cache when the power goes. A plain
``write_text`` can leave a file empty or half written, and ``os.replace``
alone can leave a rename that never reached the card. So: write a temporary
file in the same folder (a rename is atomic only within one file system),
fsync it, rename it over the target, fsync the folder so the rename itself
is durable.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_directory(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where folders cannot be opened)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        handle = os.open(folder, flags)
    except OSError:
        return  # e.g. Windows: no directory handles; NTFS journals renames itself
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems (tmpfs on old kernels, network mounts) refuse; nothing to do
    finally:
        os.close(handle)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers and a power cut see the old file or the new one."""
    path = Path(path)
    # A unique temporary name: never clobbers a file of the same name that splitkd did not write.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2).encode())


def move_atomic(source: Path, target: Path) -> None:
    """Move a finished file (e.g. a verified download) into place durably; same file system."""
    with open(source, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(source, target)
    fsync_directory(Path(target).parent)
    if Path(source).parent != Path(target).parent:
        fsync_directory(Path(source).parent)
