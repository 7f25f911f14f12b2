"""Deployment files: shell scripts, the Raspberry Pi installer, docker compose, Dockerfiles.

No docker needed: the scripts are checked with ``bash -n`` and shellcheck (when
installed), the Pi installer and the link shaper run for real in their dry-run
modes, the health check runs against a real local HTTP server, and the compose
and Dockerfile rules are read from the files. ``make compose-check`` runs the
images themselves (docs/DOCKER.md).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
PI = ROOT / "deploy" / "raspberry-pi"
INSTALL = PI / "install.sh"
SHELL_SCRIPTS = sorted(
    {*ROOT.glob("deploy/**/*.sh"), *ROOT.glob("scripts/*.sh"), *ROOT.glob(".ci/*.sh")}
)
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
LINKS = json.loads((ROOT / "splitkd" / "profiles" / "links.json").read_text())["links"]
DEVICES = json.loads((ROOT / "splitkd" / "profiles" / "devices.json").read_text())["devices"]


def _project_torch_pin() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [
        r for r in project["project"]["optional-dependencies"]["train"] if r.startswith("torch")
    ]
    return pin.split("==")[1]


def _run(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False, **kwargs
    )


def _load_yaml(path: Path) -> Any:
    """PyYAML is not a project dependency: use it where it is, else the system python3's."""
    try:
        import yaml
    except ImportError:
        system_python = shutil.which("python3", path="/usr/bin:/bin")
        if system_python is None:
            pytest.skip("no YAML parser: neither PyYAML nor a system python3 with it")
        code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
        result = _run(system_python, "-c", code, path)
        if result.returncode != 0:
            pytest.skip(f"no YAML parser (system python3: {result.stderr.strip()[-120:]})")
        return json.loads(result.stdout)
    return yaml.safe_load(path.read_text())


# -- every shell script -----------------------------------------------------------------


def test_the_deploy_scripts_are_all_found() -> None:
    names = {p.name for p in SHELL_SCRIPTS}
    assert {
        "install.sh",
        "make-base-image.sh",
        "build-wheelhouse.sh",
        "edge-entrypoint.sh",
        "shape-link.sh",
        "compose_check.sh",
    } <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses_and_is_executable(script: Path) -> None:
    result = _run("bash", "-n", script)
    assert result.returncode == 0, result.stderr
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    assert re.match(r"#!(/usr/bin/env bash|/bin/bash)\n", script.read_text()), "not a bash script"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing() -> None:
    result = _run("shellcheck", "--severity=warning", *SHELL_SCRIPTS)
    assert result.returncode == 0, result.stdout


# -- the Raspberry Pi installer, run for real in dry-run mode ---------------------------


def test_pi_install_dry_run_prints_the_pinned_training_install(tmp_path: Path) -> None:
    prefix = tmp_path / "venv"
    result = _run(INSTALL, "--dry-run", "--prefix", prefix)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"+ python3 -m venv {prefix}\n" in out
    # torch from the CPU index, pinned to the project's version, before everything else.
    torch = f"torch=={_project_torch_pin()}"
    assert f"install --index-url https://download.pytorch.org/whl/cpu {torch}\n" in out
    assert "onnxruntime==1.20.1" in out
    assert re.search(r"install -c \S+/constraints.txt onnxruntime==1\.20\.1 \S+\[train\]\n", out)
    assert out.index(torch) < out.index("[train]")
    assert "<torch smoke test>" in out
    assert "+ systemctl enable --now splitkd-edge.service" in out
    assert "splitkd-edge-train.service" in out
    # A dry run changes nothing.
    assert not prefix.exists()


def test_pi_install_inference_only_has_no_torch(tmp_path: Path) -> None:
    prefix = tmp_path / "venv"
    result = _run(INSTALL, "--dry-run", "--inference-only", "--prefix", prefix)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"+ python3 -m venv {prefix}\n" in out
    assert "onnxruntime==1.20.1" in out
    assert "torch" not in out.lower()
    assert "[train]" not in out
    assert "splitkd-edge-train.service" not in out
    assert "splitkd-edge.service" in out
    assert not prefix.exists()


def test_pi_install_offline_from_a_wheelhouse(tmp_path: Path) -> None:
    result = _run(INSTALL, "--dry-run", "--wheelhouse", tmp_path, "--no-systemd")
    assert result.returncode == 0, result.stderr
    installs = [
        line for line in result.stdout.splitlines() if " install " in line and "pip" in line
    ]
    assert len(installs) == 2
    assert all(f"--no-index --find-links {tmp_path}" in line for line in installs)
    assert "download.pytorch.org" not in result.stdout
    assert "+ systemctl" not in result.stdout


def test_pi_install_help_and_mistakes() -> None:
    helped = _run(INSTALL, "--help")
    assert helped.returncode == 0
    assert "--inference-only" in helped.stdout and "--dry-run" in helped.stdout
    wrong = _run(INSTALL, "--dry-run", "--no-such-option")
    assert wrong.returncode == 2
    assert "unknown option --no-such-option" in wrong.stderr


def test_pi_pins_explain_the_illegal_instruction_crashes() -> None:
    text = INSTALL.read_text()
    assert f'TORCH_VERSION="{_project_torch_pin()}"' in text
    assert "Illegal instruction" in text and "Cortex-A72" in text
    # Each known bad release is named, so the pins can be re-checked against them.
    for bad in ("2.4.0", "2.10.0", "1.21.0"):
        assert bad in text


def test_pi_units_and_config() -> None:
    serve = (PI / "splitkd-edge.service").read_text()
    train = (PI / "splitkd-edge-train.service").read_text()
    env = (PI / "splitkd-edge.env").read_text()
    assert "ExecStart=/opt/splitkd/bin/splitkd-edge serve" in serve
    assert "Restart=on-failure" in serve
    assert "Type=oneshot" in train and "TimeoutStartSec=infinity" in train
    for unit in (serve, train):
        assert "EnvironmentFile=/etc/splitkd/edge.env" in unit
        assert "User=splitkd" in unit
    settings = dict(
        line.split("=", 1) for line in env.splitlines() if line and not line.startswith("#")
    )
    assert all(key.startswith("SPLITKD_") for key in settings)
    assert settings["SPLITKD_DEVICE_PROFILE"] in DEVICES
    assert settings["SPLITKD_LINK_PROFILE"] in LINKS
    # Reachable by Prometheus from another machine, on the ports of its scrape config.
    assert settings["SPLITKD_HOST"] == "0.0.0.0"
    # ... so the file tells how to require a token on /v1/predict.
    assert "#SPLITKD_HTTP_TOKEN_FILE=/etc/splitkd/http.token" in env
    assert "SPLITKD_HTTP_TOKEN_FILE" in (ROOT / "docs" / "RASPBERRY_PI.md").read_text()
    assert settings["SPLITKD_HTTP_PORT"] == "8001" and settings["SPLITKD_METRICS_PORT"] == "9101"


# -- the link shaper and the edge entry point ------------------------------------------------


@pytest.mark.parametrize("profile", ["lte", "wifi", "nb-iot"])
def test_shape_link_dry_run_uses_the_profile(profile: str) -> None:
    result = _run(DOCKER / "shape-link.sh", "--dry-run", profile, "eth9")
    assert result.returncode == 0, result.stderr
    link = LINKS[profile]
    up = f"{link['bandwidth_mbps']['up'] * 1000:.0f}kbit"
    down = f"{link['bandwidth_mbps']['down'] * 1000:.0f}kbit"
    lines = result.stdout.splitlines()
    assert any(f"tc qdisc add dev eth9 parent 1:1 handle 10: tbf rate {up} " in x for x in lines)
    assert any(f"tc qdisc add dev ifb0 parent 1:1 handle 10: tbf rate {down} " in x for x in lines)
    delay = f"netem delay {link['latency_ms']:g}ms {link['jitter_ms']:g}ms"
    assert sum(delay in x for x in lines) == 2  # both directions
    assert any("mirred egress redirect dev ifb0" in x for x in lines)


def test_shape_link_refuses_an_unknown_profile() -> None:
    result = _run(DOCKER / "shape-link.sh", "--dry-run", "carrier-pigeon")
    assert result.returncode != 0
    assert "unknown link profile 'carrier-pigeon'" in result.stderr


def test_edge_entrypoint_refuses_an_unknown_mode(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "SPLITKD_EDGE_MODE": "dance",
        "SPLITKD_MODEL_DIR": str(tmp_path),
    }
    result = _run(DOCKER / "edge-entrypoint.sh", env=env)
    assert result.returncode == 2
    assert "unknown SPLITKD_EDGE_MODE 'dance'" in result.stdout


# -- the container health check against a real HTTP server ------------------------------------


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    answers = {"/ok": b'{"status": "ok"}', "/no-model": b'{"status": "no-model"}'}
    answers["/metrics"] = b"# HELP splitkd_edge_training_steps_total ...\n"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answers.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/ok", None, 0),
        ("/ok", "ok", 0),
        ("/no-model", "ok", 1),  # an edge that has not finished training
        ("/metrics", "ok", 1),  # the training metrics server answers on the same port
        ("/missing", None, 1),
    ],
)
def test_healthcheck(
    health_server: tuple[str, dict[str, bytes]], path: str, status: str | None, code: int
) -> None:
    base, _ = health_server
    args: list[str | Path] = [sys.executable, DOCKER / "healthcheck.py", base + path]
    if status:
        args += ["--status", status]
    assert _run(*args).returncode == code


def test_healthcheck_without_a_server() -> None:
    result = _run(sys.executable, DOCKER / "healthcheck.py", "http://127.0.0.1:9/healthz")
    assert result.returncode == 1


# -- docker compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = _load_yaml(ROOT / "docker-compose.yml")
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_services_all_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"cloud", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name


def test_compose_edges_wait_for_a_healthy_cloud(compose: dict[str, Any]) -> None:
    edges = {n: s for n, s in compose["services"].items() if n.startswith("edge-")}
    assert len(edges) >= 3
    for name, service in edges.items():
        assert service["depends_on"]["cloud"]["condition"] == "service_healthy", name


def test_compose_training_edges_differ_and_shape_their_links(compose: dict[str, Any]) -> None:
    training = {
        n: s
        for n, s in compose["services"].items()
        if s.get("image", "").startswith("splitkd/edge:")
    }
    assert len(training) >= 2
    profiles = set()
    for name, service in training.items():
        env = _env(service)
        assert "NET_ADMIN" in service["cap_add"], name
        assert env["SPLITKD_DEVICE_PROFILE"] in DEVICES, name
        assert env["SPLITKD_LINK_PROFILE"] in LINKS, name
        assert env["SPLITKD_DEVICE_ID"] == name
        profiles.add((env["SPLITKD_DEVICE_PROFILE"], env["SPLITKD_LINK_PROFILE"]))
    assert len({d for d, _ in profiles}) == len(training)
    assert len({link for _, link in profiles}) == len(training)


def test_compose_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert (
        "--config.file=/etc/prometheus/prometheus-compose.yml" in services["prometheus"]["command"]
    )
    config = _load_yaml(ROOT / "deploy" / "prometheus" / "prometheus-compose.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    expected = {"cloud:8000"} | {f"{n}:8001" for n in services if n.startswith("edge-")}
    assert targets == expected
    for rules in config.get("rule_files", []):
        assert (ROOT / "deploy" / "prometheus" / rules).is_file()


def test_compose_grafana_is_provisioned(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    for host in mounts:
        assert (ROOT / host).is_dir(), host


def test_compose_builds_from_our_dockerfiles(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
            assert service["image"].startswith("splitkd/"), name


def test_compose_local_override(compose: dict[str, Any]) -> None:
    local = _load_yaml(DOCKER / "compose.local.yml")["services"]
    assert set(local) <= set(compose["services"])
    assert local["prometheus"]["build"]["dockerfile"] == "deploy/docker/Dockerfile.prometheus"
    assert local["prometheus"]["healthcheck"]["test"]
    assert local["grafana"]["profiles"] == ["registry"]


# -- Dockerfiles ------------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_dockerfiles_are_all_found() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.cloud", "Dockerfile.edge", "Dockerfile.edge-infer"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_a_non_root_user(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    users = [arg for op, arg in instructions[last_from:] if op == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert any(op == "HEALTHCHECK" for op, _ in instructions[last_from:])
    assert ("ARG", "BASE_IMAGE=splitkd/base:bookworm") in instructions


@pytest.mark.parametrize("name", ["Dockerfile.cloud", "Dockerfile.edge", "Dockerfile.edge-infer"])
def test_dockerfile_installs_offline_with_pinned_versions(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert 'ARG PIP_INSTALL_OPTIONS="--no-index --find-links /wheels"' in text
    assert "-c /tmp/constraints.txt" in text
    installs = [
        arg for op, arg in _instructions(DOCKER / name) if op == "RUN" and "pip install" in arg
    ]
    if name == "Dockerfile.edge-infer":
        assert installs and not any("torch==" in arg or "[train]" in arg for arg in installs)
    else:
        assert any(f"torch=={_project_torch_pin()}" in arg for arg in installs)


def test_constraints_pin_every_package_exactly() -> None:
    pins = [
        line
        for line in (DOCKER / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", pin) for pin in pins), pins
    assert f"torch=={_project_torch_pin()}" in pins


def test_dockerignore_lets_every_copied_file_in() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for dockerfile in DOCKERFILES:
        for op, arg in _instructions(dockerfile):
            if op != "COPY" or arg.startswith("--from"):
                continue
            for source in arg.split()[:-1]:
                source = source.replace("${WHEELHOUSE}", "build/wheelhouse").rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"{dockerfile.name} copies {source}, which .dockerignore keeps out"
                )
                assert (ROOT / source).exists() or source == "build/wheelhouse", source
