"""Read a user's ``.npz`` or ``.csv`` file into plain arrays, or say in one line why not.

Nothing is unpickled: ``.npz`` members are read with ``allow_pickle=False``
after their ``.npy`` headers were checked against the bytes really there, so
a header declaring a terabyte array is refused before anything is allocated.
"""

from __future__ import annotations

import csv
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from splitkd.errors import InvalidArgument


class DataError(InvalidArgument):
    """A dataset spec or file that cannot be used; the message says why."""


@dataclass(frozen=True)
class RawData:
    """Arrays as read, before validation, and how to name sample ``i`` in a message."""

    x: np.ndarray
    y: np.ndarray
    name: str  # the dataset's name, e.g. the file's stem
    source: str  # what messages call it: the path, or "digits"
    where: Callable[[int], str]


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: Path) -> RawData:
    with path.open("rb") as handle:
        head = handle.read(8)
    if not head:
        raise DataError(f"{path}: the file is empty")
    if head.startswith(_NPY_MAGIC):
        raise DataError(
            f"{path}: a single .npy array, not an .npz archive; "
            "save both arrays with numpy.savez(path, x=x, y=y)"
        )
    if not head.startswith(_ZIP_MAGIC):
        raise DataError(f"{path}: not an .npz file (a zip of .npy arrays, as numpy.savez writes)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {n.removesuffix(".npy"): n for n in archive.namelist()}
            if "x" not in members or "y" not in members:
                raise DataError(
                    f"{path}: an npz dataset needs arrays 'x' and 'y', found {sorted(members)}"
                )
            x = _read_member(path, archive, members["x"])
            y = _read_member(path, archive, members["y"])
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_one_line(exc)})") from None
    return RawData(x, y, path.stem, str(path), lambda i: f"sample {i}")


def _read_member(path: Path, archive: zipfile.ZipFile, member: str) -> np.ndarray:
    info = archive.getinfo(member)
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise DataError(f"{path}: array {member!r} has .npy format {version}, not 1.0 or 2.0")
        stored = info.file_size - handle.tell()
    if dtype.hasobject:
        raise DataError(
            f"{path}: array {member!r} holds Python objects; splitkd never unpickles a file, "
            "save numeric arrays"
        )
    declared = prod(shape) * dtype.itemsize
    if declared != stored:
        raise DataError(
            f"{path}: array {member!r} declares shape {list(shape)} ({declared} bytes) "
            f"but holds {stored} bytes"
        )
    try:
        with archive.open(info) as handle:
            array: np.ndarray = np.lib.format.read_array(handle, allow_pickle=False)
    except MemoryError:
        raise DataError(
            f"{path}: array {member!r} ({declared / 2**30:.1f} GiB) does not fit in memory"
        ) from None
    return array


def read_csv(path: Path) -> RawData:
    """Numeric columns, the label last; an optional header row of column names."""
    rows: list[list[float]] = []
    lines: list[int] = []
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of row 1.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            first = True
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                values = [_number(cell) for cell in row]
                bad = [j for j, v in enumerate(values) if v is None]
                if bad and first and 2 * len(bad) > len(row):
                    first = False
                    continue  # a header: most of its cells are names, not numbers
                if bad:
                    raise DataError(_bad_cell(path, reader.line_num, bad[0], row, first))
                first = False
                rows.append([v for v in values if v is not None])
                lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 CSV text ({_one_line(exc)})") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    _check_widths(path, rows, lines)
    table = np.asarray(rows, dtype=np.float64)
    return RawData(table[:, :-1], table[:, -1], path.stem, str(path), lambda i: f"line {lines[i]}")


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _bad_cell(path: Path, line: int, column: int, row: list[str], first: bool) -> str:
    message = f"{path}: line {line}, column {column + 1}: {row[column][:40]!r} is not a number"
    if first:
        message += " (a header row has names, not numbers, in most of its cells)"
    return message


def _check_widths(path: Path, rows: list[list[float]], lines: list[int]) -> None:
    width = len(rows[0])
    if width < 2:
        raise DataError(f"{path}: a row needs at least 2 columns (features, then the label)")
    for row, line in zip(rows, lines, strict=True):
        if len(row) != width:
            raise DataError(
                f"{path}: line {line} has {len(row)} columns, line {lines[0]} has {width}; "
                "every row needs the same number (label last)"
            )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
