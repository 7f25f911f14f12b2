"""Cohort checkpoints in storage, so that a restarted cloud (or another replica) resumes them.

Keys of a :mod:`cloud_service.storage` store (a folder by default, the replicas'
shared folder or S3 bucket under ``cohorts/`` with ``--store``):
``NAME/cohort.json`` holds the round, members, history and pending updates'
figures; ``NAME/students-rR-CLASS.safetensors`` the class students that round
R starts from; ``NAME/pending-rR-MEMBER.safetensors`` an update taken in round
R. A round's students are written before the JSON that names the round, and
every write is atomic, so a crash at any point leaves either the old round or
the new one: nothing is applied twice.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from cloud_service.fleet.cohort import Cohort, Member, Pending, RoundRecord
from cloud_service.fleet.config import CohortPlan
from cloud_service.fleet.strategy import Contribution
from cloud_service.storage import Store, open_store
from splitkd.messages import CohortConfig
from splitkd.models.spec import ModelSpec
from splitkd.names import is_cohort_name

log = logging.getLogger(__name__)
Weights = dict[str, np.ndarray]
STATE = "cohort.json"
# The weight files this store writes (and the only ones it ever deletes).
MEMBER_ID = re.compile(r"^[0-9a-f]{32}$")  # secrets.token_hex(16), see cohort.py
_ROUND_FILE = re.compile(r"^(students|pending)-r(\d+)-[A-Za-z0-9_-][A-Za-z0-9._-]*\.safetensors$")


class CohortStore:
    """``store``: a folder (one cloud) or a shared store; ``prefix``: where cohorts sit in it."""

    def __init__(self, store: Path | Store, prefix: str = "") -> None:
        self.store: Store = open_store(str(store)) if isinstance(store, Path) else store
        self.prefix = prefix

    def _key(self, name: str, file: str = "") -> str:
        return f"{self.prefix}{name}/{file}"

    def save(self, cohort: Cohort, plan: CohortPlan) -> None:
        """Write the cohort's state (callers hold ``cohort.lock``)."""
        there = set(self.store.list(self._key(cohort.name)))
        files = [
            (f"students-r{cohort.round}-{k}.safetensors", w) for k, w in cohort.students.items()
        ] + [
            (f"pending-r{cohort.round}-{k}.safetensors", p.contribution.weights)
            for k, p in cohort.pending.items()
        ]
        for file, weights in files:
            key = self._key(cohort.name, file)
            if key not in there:  # a round's weights never change once written
                self.store.write(key, _weights_bytes(weights))
        self.store.write(self._key(cohort.name, STATE), json.dumps(_state(cohort, plan)).encode())
        self._prune(cohort.name, cohort.round, there)

    def _prune(self, name: str, current: int, keys: set[str]) -> None:
        """Drop weights of rounds before the current one (only files this store names)."""
        folder = self._key(name)
        for key in keys:
            match = _ROUND_FILE.fullmatch(key[len(folder) :])
            if match and int(match[2]) < current:
                self.store.delete(key)

    # -- which cohort a member is in (replicas: a call may land on any of them) --------
    def remember_member(self, member_id: str, name: str) -> None:
        self.store.write(self._member_key(member_id), json.dumps({"cohort": name}).encode())

    def cohort_of(self, member_id: str) -> str | None:
        """The cohort a member id joined, or None (an unknown or malformed id)."""
        if not MEMBER_ID.fullmatch(member_id):
            return None
        try:
            name = json.loads(self.store.read(self._member_key(member_id)) or b"{}").get("cohort")
        except (ValueError, AttributeError):
            return None
        return name if isinstance(name, str) and is_cohort_name(name) else None

    def _member_key(self, member_id: str) -> str:
        # "_members" is never a cohort's name (those start with a letter or digit).
        return f"{self.prefix}_members/{member_id}"

    def exists(self, name: str) -> bool:
        return self.store.read(self._key(name, STATE)) is not None

    def names(self) -> list[str]:
        """Every cohort with a checkpoint here."""
        found = set()
        for key in self.store.list(self.prefix):
            parts = key[len(self.prefix) :].split("/")
            if len(parts) == 2 and parts[1] == STATE and is_cohort_name(parts[0]):
                found.add(parts[0])
        return sorted(found)

    def load_all(self) -> list[tuple[Cohort, dict[str, Any]]]:
        out = []
        for name in self.names():
            try:
                loaded = self.load(name)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("cohort checkpoint %s cannot be restored (%s); skipped", name, exc)
                continue
            if loaded is not None:
                out.append(loaded)
        return out

    def load(self, name: str, weights: bool = True) -> tuple[Cohort, dict[str, Any]] | None:
        """The cohort as last saved, and its raw state; None when it has no checkpoint.
        Without ``weights``: rounds and members only (a look, not a cohort to run).

        Raises ValueError (or KeyError, TypeError) for a damaged one; the store's
        Unavailable when it does not answer (the caller's edge retries).
        """
        raw = self.store.read(self._key(name, STATE))
        if raw is None:
            return None
        state = json.loads(raw)
        specs = {k: ModelSpec.from_json(v["family"], v["spec"]) for k, v in state["specs"].items()}
        number = int(state["round"])
        students = {
            k: self._weights(name, f"students-r{number}-{k}.safetensors") if weights else {}
            for k in specs
        }
        cohort = Cohort(state["name"], CohortConfig(**state["config"]), specs, students)
        cohort.round, cohort.complete = number, bool(state["complete"])
        cohort.server_model_version = int(state["server_model_version"])
        cohort.published = {k: int(v) for k, v in state["published"].items()}
        cohort.members = {m["member_id"]: Member(**m) for m in state["members"]}
        cohort.history = [RoundRecord(**r) for r in state["history"]]
        cohort.opened_at = cohort.clock()
        cohort.deadline = cohort.opened_at + cohort.config.round_timeout_seconds
        for member_id, figures in state["pending"].items():
            member = cohort.members[member_id]
            update = (
                self._weights(name, f"pending-r{number}-{member_id}.safetensors") if weights else {}
            )
            contribution = Contribution(member_id, member.device_class, update, figures["samples"])
            cohort.pending[member_id] = Pending(contribution, float(figures["accuracy"]))
        return cohort, state

    def _weights(self, name: str, file: str) -> Weights:
        raw = self.store.read(self._key(name, file))
        if raw is None:
            raise ValueError(f"{file} is missing")
        try:
            return dict(load(raw))
        except SafetensorError as exc:
            raise ValueError(f"{file} is damaged ({exc})") from None


def _weights_bytes(weights: Weights) -> bytes:
    return bytes(save({k: np.ascontiguousarray(v) for k, v in weights.items()}))


def _state(cohort: Cohort, plan: CohortPlan) -> dict[str, Any]:
    return {
        "name": cohort.name,
        "config": asdict(cohort.config),
        "strategy": plan.strategy,
        "specs": {k: {"family": s.family, "spec": s.to_json()} for k, s in cohort.specs.items()},
        "round": cohort.round,
        "complete": cohort.complete,
        "server_model_version": cohort.server_model_version,
        "published": cohort.published,
        "members": [asdict(m) for m in cohort.members.values()],
        "history": [r.to_dict() for r in cohort.history],
        "pending": {
            k: {"samples": p.contribution.num_samples, "accuracy": p.accuracy}
            for k, p in cohort.pending.items()
        },
    }
