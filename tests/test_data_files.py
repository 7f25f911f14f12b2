"""A user's bad data file ends ``splitkd-edge train`` with one clear line and exit code 2.

Through the real CLI in a subprocess, so that what a user sees is what is
checked: no traceback, no numpy warning printed before the message. The
cloud address is unreachable on purpose: the data is read before any call.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a Python process (with torch) per case
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "SPLITKD_LOG_LEVEL": "WARNING"}
ROWS = "".join(f"{i * 0.5},{i % 3},{i % 2}\n" for i in range(20))


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    """A .npy file whose header declares ``shape`` (float64) but that holds no data."""
    header = repr({"descr": "<f8", "fortran_order": False, "shape": shape})
    header += " " * (63 - (10 + len(header)) % 64) + "\n"  # numpy pads the header to 64 bytes
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


def enormous(path: Path) -> None:
    labels = io.BytesIO()
    np.save(labels, np.zeros(20, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", npy_header_only((10**12, 3)))
        archive.writestr("y.npy", labels.getvalue())


CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "one bad cell in the first row": (
        "first.csv",
        lambda p: p.write_text("1,2x,0\n" + ROWS),
        "line 1, column 2: '2x' is not a number",
    ),
    "a label of 1e20": (
        "big.csv",
        lambda p: p.write_text(ROWS + "1,2,1e20\n"),
        "label 1e+20 at line 21 is not a class number",
    ),
    "a label of inf (numpy warned before the message)": (
        "inf.csv",
        lambda p: p.write_text(ROWS + "1,2,inf\n"),
        "label inf at line 21 is not a class number",
    ),
    "a feature beyond float32 (numpy warned before the message)": (
        "overflow.csv",
        lambda p: p.write_text(ROWS + "1e300,2,1\n"),
        "x at line 21 has NaN, Inf or a value beyond float32's range",
    ),
    "an empty .npz": ("empty.npz", lambda p: p.write_bytes(b""), "the file is empty"),
    "an .npz declaring an enormous shape": (
        "enormous.npz",
        enormous,
        "array 'x.npy' declares shape [1000000000000, 3] (24000000000000 bytes) but holds 0 bytes",
    ),
    "a text file named .npz": (
        "text.npz",
        lambda p: p.write_text("x,y\n1,2\n"),
        "not an .npz file (a zip of .npy arrays, as numpy.savez writes)",
    ),
}


class Started:
    """``python -m ARGS`` started now, its state in ``tmp_path``; ``result()`` waits for it."""

    def __init__(self, *args: str, tmp_path: Path) -> None:
        command = [sys.executable, "-m", *args]
        env = {**ENV, "XDG_STATE_HOME": str(tmp_path / "state")}
        self.out, self.err = tmp_path / "cli.out", tmp_path / "cli.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=err)

    def result(self) -> subprocess.CompletedProcess[str]:
        try:
            code = self.process.wait(timeout=120)
        finally:
            self.kill()
        out, err = (path.read_text() for path in (self.out, self.err))
        return subprocess.CompletedProcess(self.process.args, code, out, err)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


BOM = "a csv with a byte order mark"


def write_bom_csv(path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = "".join(f"{a:.3f},{b:.3f},{int(a > b)}\n" for a, b in rng.standard_normal((50, 2)))
    path.write_text(rows, encoding="utf-8-sig")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Started]]:
    """``splitkd-edge train`` on every case's file and ``splitkd-cloud train-teacher`` on the
    csv with a byte order mark, all started at once (each is a Python process with torch,
    and reads nothing of the others); each test reads its own."""
    runs: dict[str, Started] = {}
    try:
        tmp_path = tmp_path_factory.mktemp("bom")
        write_bom_csv(tmp_path / "bom.csv")
        runs[BOM] = Started(
            "cloud_service.cli", "-q", "train-teacher", "--data", f"csv:{tmp_path / 'bom.csv'}",
            "--out", str(tmp_path / "teacher.safetensors"), tmp_path=tmp_path,
        )  # fmt: skip
        for case, (name, write, _) in CASES.items():
            tmp_path = tmp_path_factory.mktemp("bad-file")
            write(tmp_path / name)
            kind = "npz" if name.endswith(".npz") else "csv"
            runs[case] = Started(
                "edge_agent.cli", "train", "--cloud", "127.0.0.1:1", "--data",
                f"{kind}:{tmp_path / name}", "--retry-seconds", "1", "--timeout", "2",
                "--no-progress", "--no-plots", "--report", str(tmp_path / "report.json"),
                "--model-dir", str(tmp_path / "models"), tmp_path=tmp_path,
            )  # fmt: skip
        yield runs
    finally:
        for run in runs.values():
            run.kill()


@pytest.mark.parametrize("case", CASES)
def test_a_bad_file_is_one_line_and_exit_code_2(case: str, cli_runs: dict[str, Started]) -> None:
    message = CASES[case][2]
    result = cli_runs[case].result()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("splitkd-edge: error: ") and message in lines[0], lines[0]
    for noise in ("Traceback", "Warning", "pickle", "-9223372036854775808"):
        assert noise not in result.stderr


def test_a_csv_with_a_byte_order_mark_trains_the_teacher_on_every_row(
    cli_runs: dict[str, Started],
) -> None:
    result = cli_runs[BOM].result()
    assert result.returncode == 0, result.stderr
    # All 50 rows, all of them the teacher's: 40 to train on, 10 held out, none set aside.
    assert "(40 training, 10 held-out samples, 0 set aside for the edges)" in result.stdout


def test_the_crafted_header_is_what_numpy_would_parse() -> None:
    """The enormous-shape case is only a test if numpy reads its header as declared."""
    from numpy.lib import format as npy_format

    handle = io.BytesIO(npy_header_only((10**12, 3)))
    assert npy_format.read_magic(handle) == (1, 0)
    shape, _, dtype = npy_format.read_array_header_1_0(handle)
    assert shape == (10**12, 3) and dtype == np.float64
