"""Helpers for the real-Prometheus test: processes, the generated scrape config, the HTTP API.

The scrape config under test is deploy/prometheus/prometheus.yml. We read it
through Prometheus' own parser (``promtool check service-discovery`` prints
every target with its labels as JSON), so the test needs no YAML library and
sees exactly what a real Prometheus would, then write a config with the same
jobs and labels whose targets are this test's ports. JSON is valid YAML, so
the generated file is JSON.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES_YML = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "dashboards" / "splitkd.json"
DATASOURCE_YML = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# What each port of deploy/prometheus/prometheus.yml stands for (its comments
# say the same): the cloud's HTTP port, and an edge's HTTP port, where it
# serves /metrics while it trains and then answers inference.
ROLE_BY_PORT = {8000: "cloud", 8001: "edge"}


def binaries() -> tuple[str, str] | None:
    """Paths of ``prometheus`` and ``promtool``, or None when either is missing."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        return None
    return prometheus, promtool


# ---------------------------------------------------------------- processes


@dataclass
class Spawned:
    """A child process with its output in a log file, for error messages."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        code = self.process.poll()
        state = "running" if code is None else f"exited with code {code}"
        return f"--- {self.name} ({state}), last lines of {self.log}:\n{self.tail()}"

    def stop(self, grace: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> Spawned:
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Spawned(name, process, log)


def wait_until(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    watch: Iterable[Spawned] = (),
    interval: float = 0.25,
) -> Any:
    """Call ``check`` until it returns a truthy value; fail early when a watched process dies."""
    watched = list(watch)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for child in watched:
            if child.process.poll() is not None:
                raise AssertionError(f"while waiting for {what}:\n{child.describe()}")
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(interval)
    logs = "\n".join(child.describe() for child in watched)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what} ({last_error})\n{logs}"
    )


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def http_post_json(url: str, payload: Any, timeout: float = 10.0) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# ------------------------------------------------------- the scrape config


@dataclass(frozen=True)
class ScrapeTarget:
    """One target of the deploy config as Prometheus sees it."""

    job: str
    address: str
    labels: dict[str, str]
    metrics_path: str
    scheme: str

    @property
    def role(self) -> str:
        port = int(self.address.rsplit(":", 1)[1])
        if port not in ROLE_BY_PORT:
            raise AssertionError(
                f"{PROMETHEUS_YML.name}: target {self.address} of job {self.job} has a port the "
                f"test does not know ({sorted(ROLE_BY_PORT)}); update ROLE_BY_PORT"
            )
        return ROLE_BY_PORT[port]


def job_names(config: Path) -> list[str]:
    names = re.findall(r"^\s*-\s*job_name:\s*['\"]?([^'\"\s#]+)", config.read_text(), re.M)
    return names


# promtool waits the whole --timeout for results, though static targets arrive at once: ask
# with a short timeout, and once more with a long one should a loaded machine find none in it.
SD_TIMEOUTS = ("0.5s", "5s")


def discover_job(config: Path, promtool: str, job: str) -> list[dict[str, Any]]:
    """What ``promtool check service-discovery`` finds for ``job``: one entry per target."""
    entries: list[dict[str, Any]] = []
    for timeout in SD_TIMEOUTS:
        result = subprocess.run(
            [promtool, "check", "service-discovery", f"--timeout={timeout}", str(config), job],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"promtool service-discovery {job}: {result.stderr}"
        entries = json.loads(result.stdout) or []
        if entries:
            break
    return entries


@functools.cache
def discover_targets(config: Path, promtool: str) -> list[ScrapeTarget]:
    """Every target of every job of ``config``, with labels, parsed by promtool."""
    targets: list[ScrapeTarget] = []
    for job in job_names(config):
        for entry in discover_job(config, promtool, job):
            labels = entry["labels"]
            targets.append(
                ScrapeTarget(
                    job=labels["job"],
                    address=labels["__address__"],
                    labels={
                        k: v
                        for k, v in labels.items()
                        if not k.startswith("__") and k not in ("job", "instance")
                    },
                    metrics_path=labels["__metrics_path__"],
                    scheme=labels["__scheme__"],
                )
            )
    return targets


def render_config(
    targets: list[ScrapeTarget],
    address_for: Callable[[ScrapeTarget], str],
    rule_files: list[Path],
    interval: str = "1s",
) -> dict[str, Any]:
    """A Prometheus config with the jobs and labels of ``targets`` at the test's addresses."""
    jobs: dict[str, dict[str, Any]] = {}
    for target in targets:
        job = jobs.setdefault(
            target.job,
            {
                "job_name": target.job,
                "metrics_path": target.metrics_path,
                "scheme": target.scheme,
                "static_configs": [],
            },
        )
        job["static_configs"].append({"targets": [address_for(target)], "labels": target.labels})
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": list(jobs.values()),
    }


# ----------------------------------------------------------- the HTTP API


@dataclass
class Series:
    labels: dict[str, str]
    values: list[float] = field(default_factory=list)

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]


class PrometheusAPI:
    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")

    def _get(self, path: str, **params: Any) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = http_get(url, timeout=30)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Prometheus {path} {params}: {exc.read().decode()}") from exc
        answer = json.loads(body)
        assert answer["status"] == "success", f"Prometheus {path} {params}: {answer}"
        return answer["data"]

    def ready(self) -> bool:
        try:
            http_get(f"{self.base}/-/ready", timeout=2)
        except OSError:
            return False
        return True

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", **params)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return [Series(r["metric"], [float(r["value"][1])]) for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[Series]:
        data = self._get(
            "/api/v1/query_range",
            query=expr,
            start=f"{start:.3f}",
            end=f"{end:.3f}",
            step=f"{step}",
        )
        return [Series(r["metric"], [float(v) for _, v in r["values"]]) for r in data["result"]]

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self._get("/api/v1/targets", state="active")["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        groups = self._get("/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]


# ------------------------------------------------------------ the dashboard


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str
    instant: bool


def dashboard_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every PromQL expression of every panel, rows' nested panels included."""
    queries: list[PanelQuery] = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries.append(
                PanelQuery(
                    panel["title"],
                    target.get("refId", "?"),
                    target["expr"],
                    bool(target.get("instant")) and not target.get("range", False),
                )
            )
    return queries


def all_panels(panels: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's ``$name`` / ``${name}`` variables; refuse any left over."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"dashboard variable(s) {leftover} have no test value: {expr}"
    return expr
