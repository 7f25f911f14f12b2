"""Cohort settings: the cloud's defaults (``serve`` flags) and an optional TOML file.

```toml
[cohorts.kitchen]            # one table per cohort name; every key is optional
mode = "split"               # "federated" (KOALA) or "split" (split-federated)
min_devices = 2
rounds = 5
local_epochs = 2
round_timeout = 120          # seconds
strategy = "fedavg"          # "koala" (federated default) or "fedavg" (split default)
# split mode, the frugal wire (fleet/wire.py): what a member's round sessions use when
# it asks nothing, and the codecs it may ask (default: serve's --wire-codec and
# --student-cut, any codec; with wire_codecs alone the first listed is the default)
wire_codec = "int8-stochastic"
wire_codecs = ["int8-stochastic", "int8", "float16"]
student_cut = 2
# federated mode, the frugal wire (fleet/weights.py): how the weights travel when a
# member asks nothing (default: serve's --weights-codec), and what a member may ask
weights_codec = "int8-delta"
weights_codecs = ["int8-delta", "float32"]

[cohorts.kitchen.classes.tiny]   # a student sized for a device class
widths = [4, 8]
hidden = []
```
The file is data: it can choose among registered strategies and model
families, never name code to run.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cloud_service.fleet.strategy import STRATEGIES
from splitkd.device_classes import CLASSES
from splitkd.errors import InvalidArgument
from splitkd.messages import CohortConfig

_COHORT_KEYS = {
    "mode",
    "min_devices",
    "rounds",
    "local_epochs",
    "round_timeout",
    "strategy",
    "classes",
    "wire_codec",
    "wire_codecs",
    "student_cut",
    "weights_codec",
    "weights_codecs",
}
_CLASS_KEYS = {"widths", "hidden"}


@dataclass(frozen=True)
class ClassStudent:
    widths: tuple[int, ...]
    hidden: tuple[int, ...] = ()


@dataclass(frozen=True)
class CohortPlan:
    config: CohortConfig
    strategy: str = ""  # empty: by mode (koala for federated, fedavg for split)
    classes: dict[str, ClassStudent] = field(default_factory=dict)

    @property
    def strategy_name(self) -> str:
        return self.strategy or ("koala" if self.config.mode == "federated" else "fedavg")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise InvalidArgument(f"{what} must be a list of integers")
    return tuple(value)


def _wire(name: str, table: dict[str, Any], defaults: CohortConfig) -> dict[str, Any]:
    """The split wire keys; ``wire_codecs`` alone makes its first codec the default."""
    allowed = table.get("wire_codecs", list(defaults.wire_codecs))
    if not isinstance(allowed, list) or not all(isinstance(c, str) for c in allowed):
        raise InvalidArgument(f"cohorts.{name}.wire_codecs must be a list of codec names")
    codec = table.get("wire_codec", allowed[0] if allowed else defaults.wire_codec)
    cut = table.get("student_cut", defaults.student_cut)
    if not isinstance(codec, str) or not isinstance(cut, int):
        raise InvalidArgument(f"cohorts.{name}: wire_codec is a name, student_cut an integer")
    return {"wire_codec": codec, "wire_codecs": tuple(allowed), "student_cut": cut}


def _weights_wire(name: str, table: dict[str, Any], defaults: CohortConfig) -> dict[str, Any]:
    """The federated wire keys; ``weights_codecs`` alone makes its first the default."""
    allowed = table.get("weights_codecs", list(defaults.weights_codecs))
    if not isinstance(allowed, list) or not all(isinstance(c, str) for c in allowed):
        raise InvalidArgument(f"cohorts.{name}.weights_codecs must be a list of codec names")
    codec = table.get(
        "weights_codec",
        defaults.weights_codec if not allowed or defaults.weights_codec in allowed else allowed[0],
    )
    if not isinstance(codec, str):
        raise InvalidArgument(f"cohorts.{name}: weights_codec is a name")
    return {"weights_codec": codec, "weights_codecs": tuple(allowed)}


def _plan(name: str, table: Any, defaults: CohortConfig) -> CohortPlan:
    if not isinstance(table, dict):
        raise InvalidArgument(f"cohorts.{name} must be a table")
    unknown = set(table) - _COHORT_KEYS
    if unknown:
        raise InvalidArgument(
            f"cohorts.{name}: unknown keys {sorted(unknown)}; known {sorted(_COHORT_KEYS)}"
        )
    try:
        config = replace(
            defaults,
            mode=table.get("mode", defaults.mode),
            min_devices=int(table.get("min_devices", defaults.min_devices)),
            rounds=int(table.get("rounds", defaults.rounds)),
            local_epochs=int(table.get("local_epochs", defaults.local_epochs)),
            round_timeout_seconds=float(table.get("round_timeout", defaults.round_timeout_seconds)),
            **_wire(name, table, defaults),
            **_weights_wire(name, table, defaults),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"cohorts.{name}: {exc}") from None
    strategy = str(table.get("strategy", ""))
    if strategy and strategy not in STRATEGIES:
        raise InvalidArgument(f"cohorts.{name}: unknown strategy {strategy!r}; known {STRATEGIES}")
    classes: dict[str, ClassStudent] = {}
    for class_name, spec in dict(table.get("classes", {})).items():
        if class_name not in CLASSES or not isinstance(spec, dict) or set(spec) - _CLASS_KEYS:
            raise InvalidArgument(
                f"cohorts.{name}.classes.{class_name}: classes are {CLASSES}, keys {sorted(_CLASS_KEYS)}"
            )
        classes[class_name] = ClassStudent(
            _ints(spec.get("widths"), f"cohorts.{name}.classes.{class_name}.widths"),
            _ints(spec.get("hidden", []), f"cohorts.{name}.classes.{class_name}.hidden"),
        )
    return CohortPlan(config, strategy, classes)


def load_plans(path: Path | None, defaults: CohortConfig) -> dict[str, CohortPlan]:
    """Per-cohort plans from ``path`` (None: no overrides). One clear error on a bad file."""
    if path is None:
        return {}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgument(f"cohort config {path}: cannot read it ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cohort config {path}: not valid TOML ({exc})") from None
    cohorts = raw.get("cohorts", {})
    if set(raw) - {"cohorts"} or not isinstance(cohorts, dict):
        raise InvalidArgument(f"cohort config {path}: expected only [cohorts.NAME] tables")
    try:
        return {name: _plan(name, table, defaults) for name, table in cohorts.items()}
    except InvalidArgument as exc:
        raise InvalidArgument(f"cohort config {path}: {exc}") from None
