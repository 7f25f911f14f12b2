"""A real Prometheus scrapes a real split-training run; the dashboard's queries return data.

The slow tests share one run: a Prometheus server whose configuration is
generated from deploy/prometheus/prometheus.yml (same jobs and labels, the
test's ports, 1 s scrapes), a cloud, and two edges that train and then serve
their student on one port each, as the edge images do, while one more device
runs a small federated cohort (2 rounds of 1 local epoch) against the same
cloud, so that the fleet metrics have samples. Through Prometheus'
HTTP API they check that every target was up, that every metric of
docs/OBSERVABILITY.md exists with its type and labels and grows, that the
recording rules evaluate, and that every PromQL expression of every panel of
the Grafana dashboard returns data. ``promtool`` checks the configuration and
both sides' raw /metrics text. The fast tests check the dashboard's uid and
datasource and that the docs list every metric.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitkd.demo import free_port
from splitkd.v1 import splitkd_pb2 as pb
from tests import prom_support as ps
from tests.support import make_teacher

BINARIES = ps.binaries()
needs_prometheus = pytest.mark.skipif(
    BINARIES is None,
    reason="the prometheus and promtool binaries are not installed "
    "(Debian package `prometheus`; .ci/run installs it)",
)

# Digits steps take milliseconds: 3 epochs (42 steps) pass between two 1 s scrapes. 10 epochs
# keep each edge training for several scrapes, so rates and the per-epoch accuracy are seen.
EPOCHS = 10
GOOD_PREDICTIONS = 5  # per serving edge, and one bad request
DEVICE_PROFILE, LINK_PROFILE = "raspberry-pi-4", "wifi"
PHASES = ("forward", "network", "backward")
ENERGY_COMPONENTS = ("compute", "idle", "radio")
# Every RPC of the service may appear as a method label; a plain run calls these five.
ALL_METHODS = tuple(
    m.name for service in pb.DESCRIPTOR.services_by_name.values() for m in service.methods
)
CLOUD_METHODS = ("Register", "Step", "Evaluate", "Finish", "DownloadModel")
GRAFANA_VARIABLES = {
    "__rate_interval": "15s",
    "__interval": "1s",
    "device": ".*",
    "cohort": ".*",
}
MEASURED_ENERGY = "splitkd_edge_measured_energy_joules"
# A one-device federated cohort: its rounds take a few seconds of device compute on digits.
# The cohort flags are the cloud's cohort defaults; the solo edges' split training ignores them.
COHORT, COHORT_DEVICE, COHORT_ROUNDS = "promtest", "promtest-0", 2

# The metric contract (docs/OBSERVABILITY.md): family -> (type, label -> allowed values or None).
GRPC_CODES = None  # any gRPC status name; checked to be upper case below
EDGE_FAMILIES: dict[str, tuple[str, dict[str, tuple[str, ...] | None]]] = {
    "splitkd_edge_step_duration_seconds": ("histogram", {"phase": PHASES}),
    "splitkd_edge_sent_bytes": ("counter", {}),
    "splitkd_edge_received_bytes": ("counter", {}),
    "splitkd_edge_training_steps": ("counter", {}),
    "splitkd_edge_training_loss": ("gauge", {}),
    "splitkd_edge_training_accuracy": ("gauge", {}),
    "splitkd_edge_energy_joules": ("counter", {"component": ENERGY_COMPONENTS}),
    MEASURED_ENERGY: ("counter", {}),  # optional: only with a real energy counter
    "splitkd_edge_inference_duration_seconds": ("histogram", {}),
    "splitkd_edge_inference_requests": ("counter", {"outcome": ("ok", "error")}),
    "splitkd_edge_feedback_records": ("counter", {}),
    "splitkd_edge_info": (
        "gauge",
        {"device_id": None, "device_profile": None, "link_profile": None},
    ),
}
CLOUD_FAMILIES: dict[str, tuple[str, dict[str, tuple[str, ...] | None]]] = {
    "splitkd_cloud_rpc_duration_seconds": (
        "histogram",
        {"method": ALL_METHODS, "code": GRPC_CODES},
    ),
    "splitkd_cloud_sessions": ("gauge", {}),
    "splitkd_cloud_teacher_cache_bytes": ("gauge", {"kind": ("allocated", "reserved")}),
    "splitkd_cloud_training_steps": ("counter", {}),
    "splitkd_cloud_received_bytes": ("counter", {"method": ALL_METHODS}),
    "splitkd_cloud_sent_bytes": ("counter", {"method": ALL_METHODS}),
    "splitkd_cloud_compute_duration_seconds": ("histogram", {"model": ("teacher", "student")}),
    "splitkd_cloud_models_published": ("counter", {}),
    "splitkd_cloud_auth_refusals": (
        "counter",
        {"reason": ("missing", "unknown", "revoked", "forbidden")},
    ),
    "splitkd_cloud_cohort_round": ("gauge", {"cohort": (COHORT,)}),
    "splitkd_cloud_cohort_devices": ("gauge", {"cohort": (COHORT,)}),
    "splitkd_cloud_cohort_accuracy": ("gauge", {"cohort": (COHORT,)}),
    "splitkd_cloud_server_model_version": ("gauge", {}),
    "splitkd_cloud_adaptations": ("counter", {}),
    "splitkd_cloud_teacher_updates": ("counter", {"outcome": ("accepted", "refused")}),
}

# Series that must grow on every edge: (series, one label set per child).
EDGE_COUNTERS: dict[str, list[dict[str, str]]] = {
    "splitkd_edge_step_duration_seconds_count": [{"phase": p} for p in PHASES],
    "splitkd_edge_step_duration_seconds_sum": [{"phase": p} for p in PHASES],
    "splitkd_edge_sent_bytes_total": [{}],
    "splitkd_edge_received_bytes_total": [{}],
    "splitkd_edge_training_steps_total": [{}],
    "splitkd_edge_energy_joules_total": [{"component": c} for c in ENERGY_COMPONENTS],
    "splitkd_edge_inference_duration_seconds_count": [{}],
    "splitkd_edge_inference_requests_total": [{"outcome": "ok"}, {"outcome": "error"}],
}
CLOUD_COUNTERS: dict[str, list[dict[str, str]]] = {
    "splitkd_cloud_rpc_duration_seconds_count": [
        {"method": m, "code": "OK"} for m in CLOUD_METHODS
    ],
    "splitkd_cloud_training_steps_total": [{}],
    "splitkd_cloud_received_bytes_total": [{"method": m} for m in CLOUD_METHODS],
    "splitkd_cloud_sent_bytes_total": [{"method": m} for m in CLOUD_METHODS],
    "splitkd_cloud_compute_duration_seconds_count": [{"model": "teacher"}, {"model": "student"}],
    "splitkd_cloud_models_published_total": [{}],
}


# ------------------------------------------------------------- static checks


def _dashboard() -> dict[str, Any]:
    return json.loads(ps.DASHBOARD_JSON.read_text())


def _provisioned_datasource_uid() -> str:
    found = re.findall(r"^\s*uid:\s*['\"]?([\w-]+)", ps.DATASOURCE_YML.read_text(), re.M)
    assert len(found) == 1, f"{ps.DATASOURCE_YML}: expected one datasource uid, found {found}"
    return found[0]


def test_dashboard_has_a_stable_uid_and_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    uid = _provisioned_datasource_uid()
    assert dashboard["uid"] == "splitkd-overview"
    assert "${DS_" not in ps.DASHBOARD_JSON.read_text(), (
        "use the provisioned uid, not an import input"
    )
    panels = list(ps.all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel.get("targets"), f"panel {title!r} has no query"
        assert panel.get("datasource", {}).get("uid") == uid, f"panel {title!r}: datasource"
        for target in panel["targets"]:
            assert target.get("datasource", {}).get("uid") == uid, f"{title!r} {target['refId']}"
            assert target["expr"].strip(), f"panel {title!r} {target['refId']}: empty expression"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, f"variable {variable['name']}: datasource"
        assert variable["name"] in GRAFANA_VARIABLES, (
            f"the test has no value for dashboard variable ${variable['name']}"
        )


def test_docs_list_every_metric_of_the_contract() -> None:
    docs = (ps.ROOT / "docs" / "OBSERVABILITY.md").read_text()
    listed = set(re.findall(r"^\| `(splitkd_\w+)` \|", docs, re.M))
    expected = {
        name + ("_total" if kind == "counter" else "")
        for name, (kind, _) in (EDGE_FAMILIES | CLOUD_FAMILIES).items()
    }
    assert listed == expected, f"docs only: {listed - expected}; test only: {expected - listed}"


SCRAPE_CONFIGS = sorted(p for p in ps.PROMETHEUS_YML.parent.glob("*.yml") if p != ps.RULES_YML)


@needs_prometheus
def test_promtool_accepts_the_rules() -> None:
    assert BINARIES is not None
    command = [BINARIES[1], "check", "rules", str(ps.RULES_YML)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


@needs_prometheus
@pytest.mark.parametrize("config", SCRAPE_CONFIGS, ids=lambda p: p.name)
def test_promtool_accepts_the_scrape_config(config: Path) -> None:
    """Every scrape config (the reference one and the compose testbed's) keeps the jobs and labels
    the dashboard relies on."""
    assert BINARIES is not None
    _, promtool = BINARIES
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"
    targets = ps.discover_targets(config, promtool)
    assert {t.job for t in targets} == {"splitkd-cloud", "splitkd-edge"}
    devices = [t.labels.get("device") for t in targets if t.job == "splitkd-edge"]
    assert all(devices), "every edge target needs its device label"
    assert len(devices) == len(set(devices)), f"one target per device: {devices}"
    for target in targets:
        assert target.role  # a port the test knows how to stand up
        if target.job == "splitkd-cloud":
            assert "device" not in target.labels


# ------------------------------------------------------------ the real run


@dataclass
class Run:
    api: ps.PrometheusAPI
    start: float
    end: float
    targets: int
    devices: list[str]
    cloud: str  # each target's instance label (host:port)
    edges: dict[str, str]  # device -> instance
    cloud_text: str  # raw /metrics
    edge_train_text: str
    edge_serve_text: str
    reports: dict[str, dict[str, Any]]
    cohort: dict[str, Any]  # the cloud's GET /v1/cohorts/NAME once the cohort completed

    def range(self, expr: str) -> list[ps.Series]:
        return self.api.query_range(expr, self.start, self.end)


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _increase(values: list[float]) -> float:
    """What a counter gained over ``values``, across resets (as PromQL's increase())."""
    return sum(b - a if b >= a else b for a, b in itertools.pairwise(values))


def _assert_grows(run: Run, name: str, labels: dict[str, str]) -> None:
    expr = _selector(name, labels)
    series = run.range(expr)
    assert len(series) == 1, f"{expr}: expected one series, got {[s.labels for s in series]}"
    values = series[0].finite
    assert _increase(values) > 0, f"{expr} did not grow: {values}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One training run scraped by a real Prometheus, kept up for every test of this module."""
    if BINARIES is None:
        pytest.skip("the prometheus and promtool binaries are not installed (Debian `prometheus`)")
    prometheus, promtool = BINARIES
    children: list[ps.Spawned] = []
    try:
        yield _run_testbed(
            tmp_path_factory.mktemp("prometheus-run"), prometheus, promtool, children
        )
    finally:
        for child in reversed(children):
            child.stop()


def _run_testbed(tmp: Path, prometheus: str, promtool: str, children: list[ps.Spawned]) -> Run:
    """Cloud, edges training then serving on their one port each, as the testbed runs them."""
    targets = ps.discover_targets(ps.PROMETHEUS_YML, promtool)
    devices = sorted({t.labels["device"] for t in targets if t.job == "splitkd-edge"})
    assert len(devices) >= 2, f"the deploy config should scrape at least two edges: {devices}"
    ports = {"cloud": free_port()} | {device: free_port() for device in devices}

    def address_for(target: ps.ScrapeTarget) -> str:
        key = "cloud" if target.role == "cloud" else target.labels["device"]
        return f"127.0.0.1:{ports[key]}"

    config_path = tmp / "prometheus.yml"
    config = ps.render_config(targets, address_for, [ps.RULES_YML])
    config_path.write_text(json.dumps(config, indent=2))
    check = subprocess.run(
        [promtool, "check", "config", str(config_path)], capture_output=True, text=True
    )
    assert check.returncode == 0, f"generated config rejected:\n{check.stdout}{check.stderr}"

    teacher = tmp / "teacher.safetensors"
    make_teacher().save(teacher)  # untrained but fixed: the metrics do not need a good teacher
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prom_port, grpc_port = free_port(), free_port()
    started = time.time()
    prom_argv = [
        prometheus,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    prom = ps.spawn("prometheus", prom_argv, tmp, env)
    children.append(prom)
    cloud_argv = _cli(
        "cloud_service.cli",
        "serve",
        host="127.0.0.1",
        grpc_port=grpc_port,
        http_port=ports["cloud"],
        teacher=teacher,
        state_dir=tmp / "cloud",
        epochs=EPOCHS,
        rounds=COHORT_ROUNDS,
        local_epochs=1,
        cohort_min_devices=1,
        # KOALA needs proxy inputs (the cloud has none with --teacher): with them every round
        # teaches the server model a new version, so its gauge moves.
        proxy_data="digits",
    )
    cloud = ps.spawn("cloud", cloud_argv, tmp, env)
    children.append(cloud)
    api = ps.PrometheusAPI(f"http://127.0.0.1:{prom_port}")
    ps.wait_until("Prometheus to be ready", api.ready, 30, [prom])
    cloud_url = f"http://127.0.0.1:{ports['cloud']}"
    ps.wait_until(
        "the cloud to be healthy", lambda: ps.http_get(f"{cloud_url}/healthz"), 90, [cloud]
    )
    # Scrape the cloud's counters at zero before any edge starts, so their growth shows.
    ps.wait_until(
        "Prometheus to scrape the cloud",
        lambda: api.query('up{job="splitkd-cloud"} == 1'),
        30,
        [prom, cloud],
    )

    trainers = {}
    for i, device in enumerate(devices):
        train_argv = _cli(
            "edge_agent.cli",
            "train",
            cloud=f"127.0.0.1:{grpc_port}",
            data="digits",
            shard=f"{i}/{len(devices)}",
            device_id=device,
            epochs=EPOCHS,
            report=tmp / f"{device}.json",
            model_dir=tmp / device / "models",
            device_profile=DEVICE_PROFILE,
            link_profile=LINK_PROFILE,
            metrics_port=ports[device],
            metrics_host="127.0.0.1",
            no_progress=True,
            no_plots=True,
        )
        trainers[device] = ps.spawn(f"train-{device}", train_argv, tmp, env)
    children += trainers.values()
    member = ps.spawn("cohort", _cohort_argv(f"127.0.0.1:{grpc_port}", tmp), tmp, env)
    children.append(member)

    def all_up() -> bool:
        health = [t["health"] for t in api.targets()]
        return len(health) == len(targets) and all(h == "up" for h in health)

    def all_seen_up() -> bool:
        # Not all at once: on a loaded machine one edge may finish before another starts.
        for trainer in trainers.values():
            assert trainer.process.poll() in (None, 0), trainer.describe()
        return len(api.query("max_over_time(up[10m]) == 1")) == len(targets)

    ps.wait_until("every scrape target to be up", all_seen_up, 90, [prom, cloud])
    first = devices[0]
    edge_train_text = _metrics_once_training(
        f"http://127.0.0.1:{ports[first]}/metrics", trainers[first]
    )
    for device, trainer in trainers.items():
        try:
            code = trainer.process.wait(150)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{device} did not finish\n{trainer.describe()}") from None
        assert code == 0, trainer.describe()
    cohort = _wait_for_cohort(api, cloud_url, member, [prom, cloud])

    # Then each edge serves its student on the port it trained on (one target per device).
    servers = []
    for device in devices:
        serve_argv = _cli(
            "edge_agent.cli",
            "serve",
            host="127.0.0.1",
            http_port=ports[device],
            model_dir=tmp / device / "models",
            device_id=device,
            device_profile=DEVICE_PROFILE,
            link_profile=LINK_PROFILE,
        )
        servers.append(ps.spawn(f"serve-{device}", serve_argv, tmp, env))
    children += servers
    # Let Prometheus scrape each server once before any request, so the inference
    # counters are seen starting from zero and their growth is visible.
    ps.wait_until("every scrape target to be up again", all_up, 30, [prom, cloud, *servers])
    instances = [f"127.0.0.1:{ports[device]}" for device in devices]
    ps.wait_until(
        "Prometheus to scrape every server before any request",
        lambda: _requests_seen(api, instances, ok=0, error=0),
        30,
        [prom, *servers],
    )
    for device in devices:
        _predict(f"http://127.0.0.1:{ports[device]}", servers)
    ps.wait_until(
        "Prometheus to scrape every server after its last request",
        lambda: _requests_seen(api, instances, ok=GOOD_PREDICTIONS, error=1),
        30,
        [prom, *servers],
    )
    # Two scrapes more: rate() over the last window sees every request.
    scrapes = _scrapes(api, instances)
    ps.wait_until(
        "two more scrapes of every server",
        lambda: _scrapes(api, instances) >= scrapes + 2,
        30,
        [prom, *servers],
    )
    return Run(
        api=api,
        start=started,
        end=time.time(),
        targets=len(targets),
        devices=devices,
        cloud=f"127.0.0.1:{ports['cloud']}",
        edges={d: f"127.0.0.1:{ports[d]}" for d in devices},
        cloud_text=ps.http_get(f"{cloud_url}/metrics").decode(),
        edge_train_text=edge_train_text,
        edge_serve_text=ps.http_get(f"http://127.0.0.1:{ports[first]}/metrics").decode(),
        reports={d: json.loads((tmp / f"{d}.json").read_text()) for d in devices},
        cohort=cohort,
    )


def _cohort_argv(cloud: str, tmp: Path) -> list[str]:
    """A device that trains in the cohort (no scrape target: the cloud exports the fleet)."""
    return _cli(
        "edge_agent.cli",
        "train",
        cloud=cloud,
        data="digits",
        cohort=COHORT,
        device_id=COHORT_DEVICE,
        report=tmp / f"{COHORT_DEVICE}.json",
        model_dir=tmp / COHORT_DEVICE / "models",
        device_profile=DEVICE_PROFILE,
        link_profile=LINK_PROFILE,
        no_progress=True,
        no_plots=True,
    )


def _wait_for_cohort(
    api: ps.PrometheusAPI, cloud_url: str, member: ps.Spawned, watch: list[ps.Spawned]
) -> dict[str, Any]:
    """The cohort's device finished, the cloud says complete, and Prometheus saw the last round."""
    try:
        code = member.process.wait(150)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the cohort's device did not finish\n{member.describe()}") from None
    assert code == 0, member.describe()

    def complete() -> dict[str, Any]:
        detail: dict[str, Any] = json.loads(ps.http_get(f"{cloud_url}/v1/cohorts/{COHORT}"))
        return detail if detail["complete"] else {}

    detail: dict[str, Any] = ps.wait_until("the cohort to be complete", complete, 30, watch)
    last_round = f'splitkd_cloud_cohort_round{{cohort="{COHORT}"}} == {COHORT_ROUNDS}'
    ps.wait_until(
        "Prometheus to scrape the cohort's last round", lambda: api.query(last_round), 30, watch
    )
    return detail


def _cli(module: str, command: str, **options: object) -> list[str]:
    """``python -m module command --some-option value ...``; True stands for a bare flag."""
    argv = [sys.executable, "-m", module, command]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _metrics_once_training(url: str, trainer: ps.Spawned) -> str:
    """An edge's raw /metrics once it has trained an epoch (accuracy exists from then on)."""

    def text() -> str:
        body = ps.http_get(url).decode()
        stepped = re.search(r"^splitkd_edge_training_steps_total [1-9]", body, re.M)
        return body if stepped and "splitkd_edge_training_accuracy " in body else ""

    result: str = ps.wait_until("the edge's first epoch", text, 60, [trainer])
    return result


def _requests_seen(api: ps.PrometheusAPI, instances: list[str], ok: int, error: int) -> bool:
    """Whether Prometheus' latest scrape of every server shows these request counts."""
    for instance in instances:
        for outcome, count in (("ok", ok), ("error", error)):
            labels = {"instance": instance, "outcome": outcome}
            series = api.query(_selector("splitkd_edge_inference_requests_total", labels))
            if [s.values[0] for s in series] != [count]:
                return False
    return True


def _scrapes(api: ps.PrometheusAPI, instances: list[str]) -> int:
    """Scrapes Prometheus holds of the server scraped least (one sample per scrape)."""
    counts = []
    for instance in instances:
        labels = {"instance": instance, "outcome": "ok"}
        expr = f"count_over_time({_selector('splitkd_edge_inference_requests_total', labels)}[1h])"
        series = api.query(expr)
        counts.append(int(series[0].values[0]) if series else 0)
    return min(counts)


def _predict(base_url: str, servers: list[ps.Spawned]) -> None:
    """A few good requests and one bad one."""
    ps.wait_until(
        f"{base_url} to serve the trained student",
        lambda: json.loads(ps.http_get(f"{base_url}/healthz"))["status"] == "ok",
        30,
        servers,
    )
    rng = np.random.default_rng(0)
    for _ in range(GOOD_PREDICTIONS):
        sample = rng.uniform(0, 16, size=(1, 8, 8)).tolist()
        status, answer = ps.http_post_json(f"{base_url}/v1/predict", {"inputs": [sample]})
        assert status == 200, answer
    status, _ = ps.http_post_json(f"{base_url}/v1/predict", {"inputs": [[1.0, 2.0, 3.0]]})
    assert status == 400  # a wrong shape: counted with outcome="error"


# --------------------------------------------------------- what Prometheus saw


@pytest.mark.slow
def test_every_target_was_scraped(run: Run) -> None:
    up = run.range("up")
    assert len(up) == run.targets, [s.labels for s in up]
    for series in up:
        assert max(series.finite) == 1, f"target never up: {series.labels}"
    edges = {
        (s.labels["device"], s.labels["instance"]) for s in up if s.labels["job"] == "splitkd-edge"
    }
    assert edges == set(run.edges.items())
    assert {s.labels["instance"] for s in up if s.labels["job"] == "splitkd-cloud"} == {run.cloud}


@pytest.mark.slow
def test_edge_series_exist_and_grow(run: Run) -> None:
    for device, instance in run.edges.items():
        scope = {"job": "splitkd-edge", "device": device, "instance": instance}
        for name, children in EDGE_COUNTERS.items():
            for labels in children:
                _assert_grows(run, name, scope | labels)
        loss = run.range(_selector("splitkd_edge_training_loss", scope))
        assert loss and loss[0].finite and all(v >= 0 for v in loss[0].finite), loss
        assert max(loss[0].finite) > 0, f"{device}: the loss was never set"
        accuracy = run.range(_selector("splitkd_edge_training_accuracy", scope))
        assert accuracy and accuracy[0].finite, f"{device}: no split accuracy"
        assert 0 < max(accuracy[0].finite) <= 1, accuracy[0].finite
        info = run.range(_selector("splitkd_edge_info", scope))
        assert len(info) == 1 and set(info[0].finite) == {1.0}, info
        assert info[0].labels["device_id"] == device
        assert info[0].labels["device_profile"] == DEVICE_PROFILE
        assert info[0].labels["link_profile"] == LINK_PROFILE


@pytest.mark.slow
def test_cloud_series_exist_and_grow(run: Run) -> None:
    scope = {"job": "splitkd-cloud", "instance": run.cloud}
    for name, children in CLOUD_COUNTERS.items():
        for labels in children:
            _assert_grows(run, name, scope | labels)
    sessions = run.range(_selector("splitkd_cloud_sessions", scope))
    assert len(sessions) == 1 and max(sessions[0].finite) >= 1, sessions
    # Active sessions: every edge has finished, so none is left (finished ones are kept only
    # to answer a repeated Finish, and are not active).
    assert sessions[0].finite[-1] == 0, f"sessions still active after the run: {sessions[0].finite}"


@pytest.mark.slow
def test_cloud_and_edges_agree(run: Run) -> None:
    """The cloud counted every step the edges report, and published one student per edge."""
    steps = run.api.query(_selector("splitkd_cloud_training_steps_total", {"instance": run.cloud}))
    assert steps[0].values[0] == sum(r["steps"] for r in run.reports.values())
    published = run.api.query("splitkd_cloud_models_published_total")
    assert published[0].values[0] == len(run.devices)


@pytest.mark.slow
def test_cohort_rounds_are_seen(run: Run) -> None:
    """The fleet gauges follow the cohort's rounds and agree with the cloud's /v1/cohorts."""
    scope = {"job": "splitkd-cloud", "instance": run.cloud, "cohort": COHORT}
    rounds = run.range(_selector("splitkd_cloud_cohort_round", scope))
    assert len(rounds) == 1, [s.labels for s in rounds]
    values = rounds[0].finite
    assert values == sorted(values) and values[-1] == COHORT_ROUNDS, values
    assert run.cohort["round"] == COHORT_ROUNDS and len(run.cohort["rounds"]) == COHORT_ROUNDS

    def last(name: str, labels: dict[str, str]) -> float:
        series = run.api.query(_selector(name, labels), at=run.end)
        assert len(series) == 1, f"{name}{labels}: {[s.labels for s in series]}"
        return series[0].values[0]

    assert last("splitkd_cloud_cohort_devices", scope) == run.cohort["devices"] == 1
    accuracy = last("splitkd_cloud_cohort_accuracy", scope)
    assert 0 <= accuracy <= 1
    assert accuracy == pytest.approx(run.cohort["rounds"][-1]["accuracy"])
    # A federated cohort (KOALA) teaches the server model one new version per round.
    version = last("splitkd_cloud_server_model_version", {"instance": run.cloud})
    assert version == run.cohort["server_model_version"] == 1 + COHORT_ROUNDS


def _check_families(
    text: str, contract: dict[str, tuple[str, dict[str, tuple[str, ...] | None]]], where: str
) -> None:
    families = {f.name: f for f in text_string_to_metric_families(text) if f.samples}
    for name, family in families.items():
        if not name.startswith("splitkd_"):
            continue
        if name.endswith("_created") and name.removesuffix("_created") in contract:
            continue  # the client's companion of a counter or histogram: when it started
        assert name in contract, f"{where}: {name} is not in docs/OBSERVABILITY.md (or this test)"
        kind, labels = contract[name]
        assert family.type == kind, f"{where}: {name} is a {family.type}, should be a {kind}"
        for sample in family.samples:
            names = set(sample.labels) - {"le"}
            assert names == set(labels), f"{where}: {sample.name} labels {sorted(names)}"
            for label, allowed in labels.items():
                value = sample.labels[label]
                assert value, f"{where}: {sample.name} has an empty {label}"
                if allowed is not None:
                    assert value in allowed, f"{where}: {sample.name}{{{label}={value!r}}}"
                elif label == "code":
                    assert value.isupper(), f"{where}: {sample.name} code {value!r}"
    required = set(contract) - {MEASURED_ENERGY}
    missing = required - set(families)
    assert not missing, f"{where}: no samples for {sorted(missing)}"


@pytest.mark.slow
def test_metric_types_and_labels_match_the_contract(run: Run) -> None:
    """Each process exports exactly the families of what it does: no zeros from idle parts."""
    _check_families(run.cloud_text, CLOUD_FAMILIES, "cloud")
    # What a serving edge exports: inference, and the feedback store of its HTTP API.
    inference = {
        k: v
        for k, v in EDGE_FAMILIES.items()
        if k.startswith(("splitkd_edge_inference", "splitkd_edge_feedback"))
    }
    training = {k: v for k, v in EDGE_FAMILIES.items() if k not in inference}
    serving = {**inference, "splitkd_edge_info": EDGE_FAMILIES["splitkd_edge_info"]}
    _check_families(run.edge_train_text, training, "training edge")
    _check_families(run.edge_serve_text, serving, "serving edge")


@pytest.mark.slow
def test_measured_energy_only_where_it_is_measured(run: Run) -> None:
    """Measured joules are exported only by an edge that reads a real counter, so they grow."""
    for series in run.range(f"{MEASURED_ENERGY}_total"):
        values = series.finite
        assert _increase(values) > 0, (
            f"{series.labels['instance']} ({series.labels['device']}) exports "
            f"{MEASURED_ENERGY}_total but it does not grow ({values}): "
            "export it only where the machine has an energy counter"
        )


@pytest.mark.slow
def test_edges_carry_no_device_label(run: Run) -> None:
    """The device is the scrape target: only the scrape config names it."""
    for text in (run.edge_train_text, run.edge_serve_text):
        assert not re.search(r'[{,]device="', text), "an edge series carries a device label"


@pytest.mark.slow
def test_promtool_finds_no_problem_in_either_metrics_output(run: Run) -> None:
    assert BINARIES is not None
    for name, text in (
        ("cloud", run.cloud_text),
        ("edge (training)", run.edge_train_text),
        ("edge (serving)", run.edge_serve_text),
    ):
        result = subprocess.run(
            [BINARIES[1], "check", "metrics"], input=text, capture_output=True, text=True
        )
        problems = (result.stdout + result.stderr).strip()
        assert result.returncode == 0 and not problems, f"{name} /metrics:\n{problems}"


@pytest.mark.slow
def test_recording_rules_evaluate(run: Run) -> None:
    rules = run.api.rules()
    assert rules, "no recording rules loaded"
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        series = run.range(rule["name"])
        assert any(s.finite for s in series), f"recording rule {rule['name']} produced no data"


@pytest.mark.slow
def test_every_dashboard_query_returns_data(run: Run) -> None:
    measured = re.search(rf"^{MEASURED_ENERGY}_total\b", run.edge_train_text, re.M) is not None
    variables = GRAFANA_VARIABLES | {"__range": f"{math.ceil(run.end - run.start)}s"}
    empty = []
    queries = ps.dashboard_queries(_dashboard())
    assert len(queries) >= 20
    for query in queries:
        expr = ps.substitute(query.expr, variables)
        series = run.api.query(expr, at=run.end) if query.instant else run.range(expr)
        if any(s.finite for s in series):
            continue
        if MEASURED_ENERGY in expr and not measured:
            continue  # this machine has no energy counter: the edge exports none
        empty.append(f"{query.panel} [{query.ref}]: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
