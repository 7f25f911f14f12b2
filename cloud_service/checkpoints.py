"""Sessions on disk, so that a cloud that is killed or restarted loses nothing.

Layout: ``ROOT/<session id>/session.json`` (who, what models, hyperparameters)
and ``ROOT/<session id>/step-<n>.safetensors`` (student tail + optimizer at
step n; see ``splitkd.checkpoint``). Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cloud_service.session import Session
from splitkd import checkpoint
from splitkd.classes import check_class_weights
from splitkd.errors import SplitKDError
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel

log = logging.getLogger(__name__)
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


class SessionCheckpoints:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _folder(self, session_id: str) -> Path:
        if not _SESSION_ID.fullmatch(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.root / session_id

    def save_meta(self, session: Session) -> None:
        meta = {
            "session_id": session.session_id,
            "device_id": session.device_id,
            "student": {
                "family": session.student_spec.family,
                "spec": session.student_spec.to_json(),
            },
            "teacher": {
                "family": session.teacher_spec.family,
                "spec": session.teacher_spec.to_json(),
            },
            "student_cut": session.student_cut,
            "teacher_cut": session.teacher_cut,
            "hyper": asdict(session.hyper),
            "model_name": session.model_name,
            "device_profile": session.device_profile,
            "link_profile": session.link_profile,
            "class_weights": list(session.class_weights),
            "finished_version": session.finished_version,
        }
        folder = self._folder(session.session_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".session.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, folder / "session.json")

    def save_state(self, session_id: str, state: checkpoint.TrainingState) -> None:
        folder = self._folder(session_id)
        checkpoint.write(checkpoint.step_path(folder, state.step), state)
        checkpoint.prune(folder)

    def remove(self, session_id: str) -> None:
        shutil.rmtree(self._folder(session_id), ignore_errors=True)

    def load_all(self, teacher_spec: ModelSpec, teacher: StagedModel) -> list[Session]:
        """Every session on disk that this cloud's teacher can go on serving."""
        sessions = []
        for folder in sorted(p for p in self.root.iterdir() if _SESSION_ID.fullmatch(p.name)):
            try:
                sessions.append(self._load(folder, teacher_spec, teacher))
            except (SplitKDError, OSError, ValueError, KeyError, RuntimeError) as exc:
                log.warning("session %s… not restored: %s", folder.name[:8], exc)
        return sessions

    def _load(self, folder: Path, teacher_spec: ModelSpec, teacher: StagedModel) -> Session:
        meta: dict[str, Any] = json.loads((folder / "session.json").read_text())
        spec = ModelSpec.from_json(meta["teacher"]["family"], meta["teacher"]["spec"])
        if spec != teacher_spec:
            raise ValueError("it was trained against another teacher")
        student_spec = ModelSpec.from_json(meta["student"]["family"], meta["student"]["spec"])
        hyper = Hyperparameters(**meta["hyper"])
        steps = checkpoint.available_steps(folder)
        states = {step: checkpoint.read(checkpoint.step_path(folder, step)) for step in steps}
        session = Session(
            session_id=meta["session_id"],
            device_id=meta["device_id"],
            student_spec=student_spec,
            teacher_spec=teacher_spec,
            student_cut=int(meta["student_cut"]),
            teacher_cut=int(meta["teacher_cut"]),
            hyper=hyper,
            model_name=meta["model_name"],
            student=zoo.build(student_spec, hyper.seed),
            teacher=teacher,
            device_profile=meta.get("device_profile", ""),
            link_profile=meta.get("link_profile", ""),
            class_weights=check_class_weights(
                meta.get("class_weights", []), student_spec.num_classes
            ),
            finished_version=meta.get("finished_version"),
            next_step=max(steps, default=0),
            snapshots=states,
        )
        if states:
            session.load(states[max(states)])  # live = newest; older ones stay restorable
        return session
