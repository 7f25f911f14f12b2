"""Network namespaces, veth pairs through a bridge, and tc bandwidth shaping.

The layout (``10.77.0.0/24`` by default)::

    ns PREFIX-cloud          ns PREFIX-sw (the "switch")          ns PREFIX-e0 ...
    PREFIXc 10.77.0.1 ===== PREFIXcb -+- bridge PREFIXbr -+- PREFIXe0b ===== PREFIXe0 10.77.0.10
                                      +-  ...             +- PREFIXe1b ===== PREFIXe1 10.77.0.11

The bridge lives in a namespace of its own, not in the host's: the host's
routing table, firewall and interfaces are never touched, and two runs (a test
and ``make testbed``) can use the same addresses at the same time.

Bandwidth is shaped per direction on each edge's veth pair: ``tbf`` on the
edge's end limits what the edge sends (uplink), ``tbf`` on the bridge's end
limits what the edge receives (downlink). Latency is not added here (no
``netem`` in this kernel): see ``testbed.linkemu``.

Every name starts with the run's prefix, so ``cleanup(prefix)`` finds what a
crashed run left behind. Interface names are at most 15 bytes (IFNAMSIZ - 1),
hence prefixes of at most 10 characters.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field

log = logging.getLogger("testbed.netns")

MAX_PREFIX = 10
_PREFIX = re.compile(r"^[a-z][a-z0-9]{1,9}$")
# Run prefixes made by default: "skd" + the owner's pid, e.g. skd4242.
_DEFAULT_PREFIX = re.compile(r"^skd(\d+)$")
CLOUD_ROLE = "c"
MTU_BYTES = 1514  # an Ethernet frame with its header: the smallest tbf bucket that passes one


class NetnsError(RuntimeError):
    pass


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    log.debug("$ %s", " ".join(argv))
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def available() -> str | None:
    """None when this process can build a testbed, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and tc need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"skdprobe{os.getpid() % 100}"
    if run(["ip", "netns", "add", probe], check=False).returncode != 0:
        return "`ip netns add` does not work here (no network namespace support?)"
    run(["ip", "netns", "del", probe], check=False)
    return None


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise NetnsError(
            f"prefix {prefix!r}: 2-{MAX_PREFIX} lowercase letters and digits, starting with a "
            "letter (interface names are limited to 15 characters)"
        )
    return prefix


@dataclass(frozen=True)
class Shaping:
    """Rates in bit/s: ``up`` is what the edge sends, ``down`` what it receives."""

    up_bits: float
    down_bits: float

    @classmethod
    def from_mbps(cls, up: float, down: float) -> Shaping:
        return cls(up * 1e6, down * 1e6)


@dataclass(frozen=True)
class Host:
    role: str
    namespace: str
    address: str
    interface: str
    bridge_port: str
    shaping: Shaping | None

    def exec(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def tbf_args(bits_per_second: float) -> list[str]:
    """``tc`` arguments for a token bucket at ``bits_per_second``."""
    rate_bytes = bits_per_second / 8
    # Bucket: 4 ms worth of tokens (so high rates are reachable with the
    # kernel's timer slack) but at least two frames (tbf drops a packet that
    # cannot fit the bucket; GSO super-packets are split to fit).
    burst = max(int(rate_bytes * 0.004), 2 * MTU_BYTES)
    # Queue: half a second of traffic, at least 64 KiB, so one training step's
    # request waits in the queue instead of being dropped and retransmitted.
    limit = max(int(rate_bytes * 0.5), 64 * 1024, 2 * burst)
    return ["tbf", "rate", f"{int(bits_per_second)}bit", "burst", str(burst), "limit", str(limit)]


def shape(namespace: str, device: str, bits_per_second: float) -> None:
    """Limit what ``device`` (inside ``namespace``) sends to ``bits_per_second``."""
    run(
        [
            "tc",
            "-n",
            namespace,
            "qdisc",
            "replace",
            "dev",
            device,
            "root",
            *tbf_args(bits_per_second),
        ]
    )


@dataclass
class Network:
    """``with Network("skd42") as net: net.add_host("e0", Shaping(...))``; removed on exit."""

    prefix: str
    subnet: str = "10.77.0"
    hosts: dict[str, Host] = field(default_factory=dict)
    _built: bool = False

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if not re.match(r"^\d{1,3}\.\d{1,3}\.\d{1,3}$", self.subnet):
            raise NetnsError(f"subnet {self.subnet!r} must be the first three octets, e.g. 10.77.0")

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def build(self) -> Network:
        cleanup(self.prefix)  # a crashed run with a recycled pid may have left these
        self._built = True
        run(["ip", "netns", "add", self.switch])
        run(["ip", "-n", self.switch, "link", "set", "lo", "up"])
        run(["ip", "-n", self.switch, "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "-n", self.switch, "link", "set", self.bridge, "up"])
        return self

    def add_host(self, role: str, shaping: Shaping | None = None) -> Host:
        """A namespace named PREFIX-ROLE with one address, wired to the bridge."""
        if not self._built:
            raise NetnsError("build() the network before adding hosts")
        if not re.match(r"^[a-z][a-z0-9]{0,3}$", role) or role in self.hosts:
            raise NetnsError(f"role {role!r}: 1-4 lowercase letters/digits, unique per network")
        namespace = f"{self.prefix}-{role}"
        edges = sum(1 for r in self.hosts if r != CLOUD_ROLE)
        address = f"{self.subnet}.{1 if role == CLOUD_ROLE else 10 + edges}"
        host = Host(
            role=role,
            namespace=namespace,
            address=address,
            interface=f"{self.prefix}{role}",
            bridge_port=f"{self.prefix}{role}b",
            shaping=shaping,
        )
        self.hosts[role] = host
        run(["ip", "netns", "add", namespace])
        # Loopback down would break every service bound to 127.0.0.1 in there.
        run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        # Both ends are born in their namespaces: nothing ever appears in the host's.
        veth = f"{host.interface} netns {namespace} type veth peer name {host.bridge_port}"
        run(["ip", "link", "add", *veth.split(), "netns", self.switch])
        run(["ip", "-n", self.switch, "link", "set", host.bridge_port, "master", self.bridge])
        run(["ip", "-n", self.switch, "link", "set", host.bridge_port, "up"])
        run(["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", host.interface])
        run(["ip", "-n", namespace, "link", "set", host.interface, "up"])
        if shaping is not None:
            # Egress of the edge's end: the uplink; egress of the bridge's end: the downlink.
            shape(namespace, host.interface, shaping.up_bits)
            shape(self.switch, host.bridge_port, shaping.down_bits)
        return host

    def qdiscs(self) -> dict[str, str]:
        """``tc -s qdisc`` of every shaped interface (sent, dropped, overlimits), by name."""
        out = {}
        for host in self.hosts.values():
            if host.shaping is None:
                continue
            for ns, dev in ((host.namespace, host.interface), (self.switch, host.bridge_port)):
                text = run(["tc", "-n", ns, "-s", "qdisc", "show", "dev", dev], check=False).stdout
                out[f"{ns}/{dev}"] = " ".join(text.split())
        return out

    def teardown(self) -> list[str]:
        if not self._built:
            return []
        self._built = False
        return cleanup(self.prefix)

    def __enter__(self) -> Network:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def namespaces(prefix: str) -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{prefix}-")]


def host_links(prefix: str) -> list[str]:
    """Interfaces in the host's own namespace whose name starts with ``prefix``."""
    out = run(["ip", "-o", "link", "show"], check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(prefix)]


def leftovers(prefix: str) -> list[str]:
    return namespaces(prefix) + host_links(prefix)


def pids(namespace: str) -> list[int]:
    out = run(["ip", "netns", "pids", namespace], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_all(names: list[str], grace: float) -> None:
    """SIGTERM every process inside these namespaces, then SIGKILL after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        found = [pid for ns in names for pid in pids(ns)]
        if not found:
            return
        for pid in found:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(pids(ns) for ns in names):
            time.sleep(0.1)


def cleanup(prefix: str, grace: float = 3.0) -> list[str]:
    """Remove every namespace and host interface named ``prefix``…; return what was removed.

    Processes still inside those namespaces are ended first: a namespace with a
    process in it outlives ``ip netns del`` (only its name goes away).
    """
    names = namespaces(prefix)
    _kill_all(names, grace)
    removed = []
    for name in names:
        if run(["ip", "netns", "del", name], check=False).returncode == 0:
            removed.append(name)
    for link in host_links(prefix):
        if run(["ip", "link", "del", link], check=False).returncode == 0:
            removed.append(link)
    if removed:
        log.info("removed %s", ", ".join(removed))
    return removed


def stale_prefixes() -> list[str]:
    """Default prefixes (``skd<pid>``) whose owning process is gone: crashed runs."""
    out = run(["ip", "netns", "list"], check=False).stdout
    prefixes = {line.split()[0].split("-")[0] for line in out.splitlines() if "-" in line}
    stale = []
    for prefix in sorted(prefixes):
        match = _DEFAULT_PREFIX.match(prefix)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            stale.append(prefix)
    return stale
