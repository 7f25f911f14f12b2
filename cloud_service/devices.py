"""Enrolled devices: ``STATE_DIR/devices.json``, with credentials stored only as salted hashes.

A credential is 32 random bytes (``secrets.token_urlsafe``), shown once by
``splitkd-cloud devices add``. The file keeps a per-device salt and
SHA-256(salt + credential): with 256 bits of entropy in the credential a
fast hash is enough (nobody can guess through it), and it keeps checking a
credential on every RPC cheap. A slow password hash would only be needed for
secrets people choose.

The running cloud re-reads the file when it changes, so ``devices revoke``
takes effect at the next call without a restart. A damaged file stops
``splitkd-cloud serve`` and the ``devices`` commands with one line naming it;
damaged while the cloud runs, it is logged and the last good copy stays in
force (never a traceback, never the server's path in an answer to a device).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from splitkd import names
from splitkd.atomic import write_bytes_atomic
from splitkd.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)
DEVICES_FILE = "devices.json"
ENROLLED = "enrolled"
REVOKED = "revoked"
_FORMAT = 1


class Verdict(Enum):
    OK = "ok"
    UNKNOWN = "unknown"  # no such device, or the credential does not match
    REVOKED = "revoked"  # the right credential of a revoked device


@dataclass(frozen=True)
class Device:
    name: str
    state: str
    salt: str
    digest: str
    enrolled_at: str
    revoked_at: str = ""

    def public(self) -> dict[str, str]:
        """What ``devices list`` shows: never the salt or the digest."""
        return {
            "name": self.name,
            "state": self.state,
            "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at,
        }


def _digest(salt: str, credential: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + credential.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _device(name: str, fields: Any) -> Device:
    """One entry, checked: a hand-edited file must fail here, not in a later call."""
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise ValueError(f"entry {name[:64]!r} is not a set of text fields")
    device = Device(**fields)
    if device.name != name or device.state not in (ENROLLED, REVOKED):
        raise ValueError(f"entry {name[:64]!r} has another name or an unknown state")
    bytes.fromhex(device.salt)
    if len(bytes.fromhex(device.digest)) != hashlib.sha256().digest_size:
        raise ValueError(f"entry {name[:64]!r} has no SHA-256 digest")
    return device


def check_device_name(name: str) -> str:
    if not names.is_device_id(name):
        shown = repr(name) if len(name) <= 64 else f"of {len(name)} characters"
        raise InvalidArgument(f"device name {shown} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


class DeviceRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._devices: dict[str, Device] = {}
        self._seen: tuple[int, int, int] | None = None
        self._damaged = False
        # Checked when a device is unknown, so that unknown and wrong answer in the same time.
        self._decoy = Device("", REVOKED, secrets.token_hex(16), "0" * 64, "")

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> DeviceRegistry:
        return cls(state_dir / DEVICES_FILE)

    # Reading ---------------------------------------------------------------

    def _load_file(self) -> dict[str, Device]:
        try:
            raw: Any = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(
                f"cannot read the device registry {self.path}: {exc}"
            ) from None
        devices = raw.get("devices") if isinstance(raw, dict) else None
        if (
            not isinstance(raw, dict)
            or raw.get("format") != _FORMAT
            or not isinstance(devices, dict)
        ):
            raise FailedPrecondition(f"{self.path} is not a splitkd device registry (format 1)")
        try:
            return {name: _device(name, fields) for name, fields in devices.items()}
        except (TypeError, ValueError) as exc:
            raise FailedPrecondition(f"{self.path}: malformed device entry ({exc})") from None

    def _refresh(self, *, strict: bool = True) -> dict[str, Device]:
        """The devices, re-read only when the file changed (one stat per call).

        Not ``strict`` (authenticating a call): a damaged file is logged once and
        the last good copy stays in force; a registry never read well denies all.
        """
        try:
            stat = self.path.stat()
            # A new inode on every write (os.replace), so a change is never missed.
            seen: tuple[int, int, int] | None = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._seen:
                try:
                    self._devices = self._load_file() if seen is not None else {}
                    self._damaged = False
                except FailedPrecondition as exc:
                    if strict:
                        raise
                    log.error("%s; the last good copy stays in force", exc)
                    self._damaged = True
                self._seen = seen
            return self._devices

    def devices(self) -> list[Device]:
        return sorted(self._refresh().values(), key=lambda d: d.name)

    def has_entries(self) -> bool:
        """True once any device was ever enrolled (revoked ones count: revoking the
        last device must not switch authentication off), or the file is damaged."""
        devices = self._refresh(strict=False)
        return bool(devices) or self._damaged

    def verify(self, name: str, credential: str) -> Verdict:
        device = self._refresh(strict=False).get(name)
        candidate = device or self._decoy
        matches = hmac.compare_digest(_digest(candidate.salt, credential), candidate.digest)
        if device is None or not matches:
            return Verdict.UNKNOWN
        return Verdict.OK if device.state == ENROLLED else Verdict.REVOKED

    # Changing (the CLI) -------------------------------------------------------

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Device]]:
        """Read-modify-write under a file lock, written atomically with mode 0600."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            devices = self._load_file()
            yield devices
            body = {
                "format": _FORMAT,
                "hash": "sha256(salt + credential)",
                "devices": {name: asdict(d) for name, d in sorted(devices.items())},
            }
            # fsynced and renamed; mkstemp makes the file 0600 (credential hashes inside).
            write_bytes_atomic(self.path, (json.dumps(body, indent=2) + "\n").encode())

    def add(self, name: str, *, replace: bool = False) -> str:
        """Enroll ``name`` and return its new credential (the only time it is visible)."""
        check_device_name(name)
        credential = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        with self._editing() as devices:
            old = devices.get(name)
            if old is not None and not replace:
                raise FailedPrecondition(
                    f"device {name!r} is already {old.state}; add --replace to issue a new credential"
                )
            devices[name] = Device(name, ENROLLED, salt, _digest(salt, credential), _now())
        return credential

    def revoke(self, name: str) -> Device:
        with self._editing() as devices:
            device = devices.get(name)
            if device is None:
                raise NotFound(
                    f"device {name!r} is not enrolled (see 'splitkd-cloud devices list')"
                )
            if device.state != REVOKED:
                device = Device(**{**asdict(device), "state": REVOKED, "revoked_at": _now()})
                devices[name] = device
        return device
