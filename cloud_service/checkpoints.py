"""Sessions on disk, so that a cloud that is killed or restarted loses nothing.

Layout: ``ROOT/<session id>/session.json`` (who, what models, hyperparameters)
and ``ROOT/<session id>/step-<n>.safetensors`` (student tail + optimizer at
step n; see ``splitkd.checkpoint``). Every file is written atomically and
fsynced. A session is written once it has trained (its first step) and
removed when it finishes or expires: only the files named here are ever
deleted, never anything else an operator put in these folders.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cloud_service.session import Session
from cloud_service.teacher import Teacher, TeacherVersions
from cloud_service.teacher_cache import for_spec
from splitkd import checkpoint
from splitkd.atomic import write_json_atomic
from splitkd.classes import check_class_weights
from splitkd.errors import SplitKDError
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel

log = logging.getLogger(__name__)
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
# What this module (and splitkd.checkpoint) writes in a session folder, temporary files included.
_OURS = re.compile(
    r"^(session\.json|step-\d{9}\.safetensors|\.(session\.json|step-\d{9}\.safetensors)\.([a-z0-9_]+\.)?tmp)$"
)


class Unrestorable(Exception):
    """A session folder that no cloud could restore (damaged), as opposed to one for another teacher."""


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
            "teacher_version": session.teacher_version,
            "hyper": asdict(session.hyper),
            "model_name": session.model_name,
            "device_profile": session.device_profile,
            "link_profile": session.link_profile,
            # Written at the first step. Folders of older versions lack it; those with
            # nothing past step 0 may be a flood of bare registrations (see _load).
            "trained": True,
            "class_weights": list(session.class_weights),
            # The cache itself is not saved: after a restart the edge's next step
            # misses and sends its teacher activations again (teacher_cache.py).
            "teacher_cache_samples": 0 if session.cache is None else session.cache.capacity,
        }
        folder = self._folder(session.session_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "session.json", meta)

    def save_state(self, session_id: str, state: checkpoint.TrainingState) -> None:
        folder = self._folder(session_id)
        checkpoint.write(checkpoint.step_path(folder, state.step), state)
        checkpoint.prune(folder)

    def remove(self, session_id: str) -> None:
        """Delete the session's files (only ours), and its folder once empty."""
        folder = self._folder(session_id)
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if _OURS.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            log.warning("kept %s: it holds files splitkd did not write", folder)

    def load_all(self, teachers: TeacherVersions) -> list[Session]:
        """Every session on disk that this cloud's teacher (at its version) can go on serving.

        A damaged session (no readable metadata, no intact checkpoint) is
        removed with one line; one trained against another teacher is kept
        for a cloud that has that teacher.
        """
        sessions = []
        for folder in sorted(p for p in self.root.iterdir() if _SESSION_ID.fullmatch(p.name)):
            try:
                sessions.append(self._load(folder, teachers))
            except Unrestorable as exc:
                self.remove(folder.name)
                log.warning("session %s… cannot be restored (%s); removed", folder.name[:8], exc)
            except (SplitKDError, OSError, ValueError, KeyError, RuntimeError) as exc:
                log.warning("session %s… not restored: %s", folder.name[:8], exc)
        return sessions

    def _load(self, folder: Path, teachers: TeacherVersions) -> Session:
        try:
            meta: dict[str, Any] = json.loads((folder / "session.json").read_text())
            spec = ModelSpec.from_json(meta["teacher"]["family"], meta["teacher"]["spec"])
        except (OSError, ValueError, KeyError, TypeError, SplitKDError) as exc:
            raise Unrestorable(f"session.json is unreadable: {exc}") from None
        if meta.get("session_id") != folder.name:
            raise Unrestorable("session.json names another session")
        if meta.get("finished_version") is not None:
            raise Unrestorable("it finished; its student is published")
        if not meta.get("trained") and checkpoint.available_steps(folder) in ([], [0]):
            raise Unrestorable("it never trained (saved at registration by an older splitkd)")
        # The session goes on against the server-model version it started with.
        teacher = teachers.get(int(meta.get("teacher_version", 1)))  # FailedPrecondition: kept
        teacher_spec = teacher.spec
        if spec != teacher_spec:
            raise ValueError("it was trained against another teacher")
        try:
            return self._session(folder, meta, teacher_spec, teacher)
        except (SplitKDError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise Unrestorable(str(exc)) from None

    def _session(
        self, folder: Path, meta: dict[str, Any], teacher_spec: ModelSpec, teacher: Teacher
    ) -> Session:
        student_spec = ModelSpec.from_json(meta["student"]["family"], meta["student"]["spec"])
        hyper = _hyper(meta["hyper"])
        student = zoo.build(student_spec, hyper.seed)
        capacity = int(meta.get("teacher_cache_samples", 0))
        states = _intact_states(folder, student)
        if not states:
            raise Unrestorable("no intact checkpoint")
        session = Session(
            session_id=meta["session_id"],
            device_id=meta["device_id"],
            student_spec=student_spec,
            teacher_spec=teacher_spec,
            student_cut=int(meta["student_cut"]),
            teacher_cut=int(meta["teacher_cut"]),
            hyper=hyper,
            model_name=meta["model_name"],
            student=student,
            teacher=teacher.model,
            teacher_version=teacher.version,
            device_profile=meta.get("device_profile", ""),
            link_profile=meta.get("link_profile", ""),
            class_weights=check_class_weights(
                meta.get("class_weights", []), student_spec.num_classes
            ),
            next_step=max(states),
            snapshots=states,
            cache=for_spec(capacity, student_spec) if capacity > 0 else None,
        )
        session.load(states[max(states)])  # live = newest; older ones stay restorable
        return session


def _hyper(saved: dict[str, Any]) -> Hyperparameters:
    """Hyperparameters as saved; folders of versions before the wire codecs had wire_dtype."""
    saved = dict(saved)
    if "wire_dtype" in saved:
        saved.setdefault("wire_codec", saved.pop("wire_dtype"))
    return Hyperparameters(**saved)


def _intact_states(folder: Path, student: StagedModel) -> dict[int, checkpoint.TrainingState]:
    """The checkpoints that can be loaded, by step: a torn file, or one whose content
    is another step's or another model's, is skipped (older ones still serve)."""
    expected = {name: tuple(t.shape) for name, t in student.state_dict().items()}
    states = {}
    for step in checkpoint.available_steps(folder):
        try:
            state = checkpoint.read(checkpoint.step_path(folder, step))
        except SplitKDError as exc:
            log.warning("%s: ignoring the checkpoint of step %d: %s", folder.name[:8], step, exc)
            continue
        shapes = {name: tuple(t.shape) for name, t in state.model.items()}
        if state.step != step or shapes != expected:
            log.warning(
                "%s: ignoring the checkpoint of step %d: it holds %s",
                folder.name[:8],
                step,
                f"step {state.step}" if state.step != step else "another model",
            )
            continue
        states[step] = state
    return states
