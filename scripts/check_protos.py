"""Regenerate the protobuf stubs into a temporary folder and compare with the committed ones."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["splitkd_pb2.py", "splitkd_pb2.pyi", "splitkd_pb2_grpc.py", "splitkd_pb2_grpc.pyi"]


def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{ROOT / 'protos'}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                f"--mypy_out={out}",
                f"--mypy_grpc_out={out}",
                str(ROOT / "protos/splitkd/v1/splitkd.proto"),
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        drifted = [
            name
            for name in GENERATED
            if not (ROOT / "splitkd/v1" / name).is_file()
            or not filecmp.cmp(
                Path(out) / "splitkd/v1" / name, ROOT / "splitkd/v1" / name, shallow=False
            )
        ]
    if drifted:
        print(
            f"generated stubs drifted from protos/: {', '.join(drifted)}; run 'make proto' and commit"
        )
        return 1
    print("protobuf stubs match protos/splitkd/v1/splitkd.proto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
