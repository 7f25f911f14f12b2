"""Option defaults from the environment: ``SPLITKD_`` + the option's name in capitals.

One place for the convention, so that a container or a systemd unit configures
every command the same way (``SPLITKD_CLOUD``, ``SPLITKD_TLS_CERT``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def env(name: str, default: str | None = None) -> str | None:
    """``SPLITKD_<NAME>``, or ``default`` when it is unset or empty."""
    return os.environ.get(f"SPLITKD_{name}") or default


def env_path(name: str) -> Path | None:
    value = env(name)
    return Path(value) if value else None


def env_flag(name: str) -> bool:
    return (env(name) or "").strip().lower() in _TRUE
