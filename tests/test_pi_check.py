"""make pi-check: its refusals and its report; not the emulated run itself (minutes, root).

The full check (scripts/pi_check.sh: arm64 chroot under qemu-user, the Pi installer,
pull/serve/predict/train) is run by hand with ``make pi-check``; docs/RASPBERRY_PI.md
has its figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from testbed import pi_report

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pi_check.sh"


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _as_non_root(*args: str | Path) -> list[str | Path]:
    """The command as an unprivileged user: as it is when not root, else through setpriv."""
    if os.geteuid() != 0:
        return list(args)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv: cannot drop privileges")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *args]


def test_refuses_without_binfmt_support_in_one_line(tmp_path: Path) -> None:
    result = _run(SCRIPT, env={"PI_CHECK_BINFMT_DIR": str(tmp_path / "absent")})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no binfmt_misc" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_refuses_without_root_in_one_line() -> None:
    # Any folder the unprivileged user can see stands in for binfmt_misc.
    result = _run(*_as_non_root(SCRIPT), env={"PI_CHECK_BINFMT_DIR": "/"})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "pi-check: needs root (apt-get, binfmt_misc, debootstrap, chroot, cgroups)"
    )


def test_usage_mistakes_exit_2_and_help_lists_the_switches() -> None:
    wrong = _run(SCRIPT, "--board", "pi3")
    assert wrong.returncode == 2
    assert wrong.stderr.splitlines()[0] == "pi-check: --board takes pi4, pi5 or both"
    assert _run(SCRIPT, "--no-such-option").returncode == 2
    helped = _run(SCRIPT, "--help")
    assert helped.returncode == 0
    for switch in ("--train", "--torch-from-registry", "--board"):
        assert switch in helped.stdout


RESULTS = (
    "pi4\tinference\tcpu\tcortex-a72\n"
    "pi4\tinference\tvenv_mb\t190\n"
    "pi4\tinference\tserve_vmhwm_mb\t140\n"
    "\n"
    "pi5\ttrain\ttrain_accuracy\t0.81\n"
    "pi4\tinference\tvenv_mb\t191\n"
)


def test_parse_results_groups_by_board_and_stage_and_keeps_the_last_value() -> None:
    results = pi_report.parse_results(RESULTS)
    assert results == {
        "pi4": {"inference": {"cpu": "cortex-a72", "venv_mb": "191", "serve_vmhwm_mb": "140"}},
        "pi5": {"train": {"train_accuracy": "0.81"}},
    }
    with pytest.raises(ValueError, match="line 2"):
        pi_report.parse_results("pi4\tinference\tcpu\tcortex-a72\npi4 inference venv_mb 190\n")


def test_table_has_a_row_per_board_and_stage_and_dashes_for_missing_figures() -> None:
    lines = pi_report.table(pi_report.parse_results(RESULTS)).splitlines()
    assert len(lines) == 4  # heading, rule, pi4 inference, pi5 train
    assert lines[0].startswith("| board") and set(lines[1]) <= {"|", "-"}
    assert "cortex-a72" in lines[2] and "191" in lines[2] and "140" in lines[2]
    assert "0.81" in lines[3] and "cortex-a72" not in lines[3] and " - " in lines[3]
    # Every row has the same width, so the markdown table lines up.
    assert len({len(line) for line in lines}) == 1


def test_percentile_is_a_measured_value() -> None:
    assert pi_report.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert pi_report.percentile([1.0, 2.0], 50) == 1.0
    assert pi_report.percentile(list(map(float, range(1, 101))), 95) == 95.0
    assert pi_report.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        pi_report.percentile([], 50)


def test_render_writes_json_and_markdown_labelled_emulated(tmp_path: Path) -> None:
    (tmp_path / "results.tsv").write_text(RESULTS)
    code = pi_report.main(["render", str(tmp_path), "--note", "a note"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["emulated"] is True
    assert report["results"]["pi4"]["inference"]["venv_mb"] == "191"
    assert report["notes"] == ["a note"]
    markdown = (tmp_path / "report.md").read_text()
    assert "**emulated**" in markdown and "- a note" in markdown and "| pi5" in markdown


def test_render_without_results_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pi_report.main(["render", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pi_report: ") and err.count("\n") == 1


@pytest.fixture
def predict_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body: Any = json.loads(self.rfile.read(int(self.headers["content-length"])))
            assert body == {"inputs": [[[0.5]]]}
            answer = {"predictions": [{"class": 3}], "seconds": 0.002}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/predict"
    server.shutdown()
    thread.join()


def test_latency_posts_the_sample_and_reports_milliseconds(predict_server: str) -> None:
    figures = pi_report.measure_latency(predict_server, [[[0.5]]], 5)
    assert figures["predicted_class"] == "3"
    assert figures["predict_server_p50_ms"] == "2.0"
    assert float(figures["predict_http_p50_ms"]) > 0
    assert float(figures["predict_http_p95_ms"]) >= float(figures["predict_http_p50_ms"])
