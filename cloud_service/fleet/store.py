"""Cohort checkpoints on disk, so that a restarted cloud resumes its cohorts.

``ROOT/NAME/cohort.json`` holds the round, members, history and pending
updates' figures; ``students-rR-CLASS.safetensors`` the class students that
round R starts from; ``pending-rR-MEMBER.safetensors`` an update taken in
round R. A round's students are written before the JSON that names the round,
and every write is atomic, so a crash at any point leaves either the old
round or the new one: nothing is applied twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save

from cloud_service.fleet.cohort import Cohort, Member, Pending, RoundRecord
from cloud_service.fleet.config import CohortPlan
from cloud_service.fleet.strategy import Contribution
from splitkd.atomic import write_bytes_atomic, write_json_atomic
from splitkd.messages import CohortConfig
from splitkd.models.spec import ModelSpec

log = logging.getLogger(__name__)
Weights = dict[str, np.ndarray]


def _save_weights(path: Path, weights: Weights) -> None:
    write_bytes_atomic(path, save({k: np.ascontiguousarray(v) for k, v in weights.items()}))


class CohortStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def save(self, cohort: Cohort, plan: CohortPlan) -> None:
        """Write the cohort's state (callers hold ``cohort.lock``)."""
        folder = self.root / cohort.name
        folder.mkdir(exist_ok=True)
        for device_class, weights in cohort.students.items():
            path = folder / f"students-r{cohort.round}-{device_class}.safetensors"
            if not path.exists():
                _save_weights(path, weights)
        for member_id, pending in cohort.pending.items():
            path = folder / f"pending-r{cohort.round}-{member_id}.safetensors"
            if not path.exists():
                _save_weights(path, pending.contribution.weights)
        state = {
            "name": cohort.name,
            "config": asdict(cohort.config),
            "strategy": plan.strategy,
            "specs": {
                k: {"family": s.family, "spec": s.to_json()} for k, s in cohort.specs.items()
            },
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
        write_json_atomic(folder / "cohort.json", state)
        self._prune(folder, cohort.round)

    def _prune(self, folder: Path, current: int) -> None:
        """Drop files of rounds before the current one (all named by this store)."""
        for path in folder.glob("*-r*-*.safetensors"):
            round_text = path.name.split("-r", 1)[1].split("-", 1)[0]
            if round_text.isdigit() and int(round_text) < current:
                path.unlink(missing_ok=True)

    def load_all(self) -> list[tuple[Cohort, dict[str, Any]]]:
        out = []
        for path in sorted(self.root.glob("*/cohort.json")):
            try:
                out.append(self._load(path))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error(
                    "cohort checkpoint %s cannot be restored (%s); skipped", path.parent.name, exc
                )
        return out

    def _load(self, path: Path) -> tuple[Cohort, dict[str, Any]]:
        state = json.loads(path.read_text())
        folder = path.parent
        specs = {k: ModelSpec.from_json(v["family"], v["spec"]) for k, v in state["specs"].items()}
        number = int(state["round"])
        students = {
            k: load_file(str(folder / f"students-r{number}-{k}.safetensors")) for k in specs
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
            weights = load_file(str(folder / f"pending-r{number}-{member_id}.safetensors"))
            contribution = Contribution(member_id, member.device_class, weights, figures["samples"])
            cohort.pending[member_id] = Pending(contribution, float(figures["accuracy"]))
        return cohort, state
