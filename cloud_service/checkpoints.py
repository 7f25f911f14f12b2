"""Sessions in storage, so that a cloud that is killed or restarted loses nothing.

Layout (keys of a :mod:`cloud_service.storage` store, a folder by default):
``<id>/session.json`` (who, what models, hyperparameters) and
``<id>/step-<n>.safetensors`` (student tail + optimizer at step n; see
``splitkd.checkpoint``); with replicas, ``<id>/lease-<g>`` too (see
``cloud_service.leases``). Every object is published atomically. A session is
written once it has trained (its first step) and removed when it finishes or
expires: only the keys named here are ever deleted, never anything else an
operator put there.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cloud_service.session import Session
from cloud_service.storage import Store, open_store
from cloud_service.teacher import Teacher, TeacherVersions
from cloud_service.teacher_cache import for_spec
from splitkd import checkpoint
from splitkd.classes import check_class_weights
from splitkd.errors import SplitKDError
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel

log = logging.getLogger(__name__)
SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
# What this module (and the leases) write for a session.
_OURS = re.compile(r"^(session\.json|step-\d{9}\.safetensors|lease-\d{9})$")
_STEP = re.compile(r"^step-(\d{9})\.safetensors$")


class Unrestorable(Exception):
    """A session folder that no cloud could restore (damaged), as opposed to one for another teacher."""


class SessionCheckpoints:
    """``store``: a folder (as before) or a shared store; ``prefix``: where sessions sit in it."""

    def __init__(self, store: Path | Store, prefix: str = "") -> None:
        self.store: Store = open_store(str(store)) if isinstance(store, Path) else store
        self.prefix = prefix

    def _key(self, session_id: str, name: str = "") -> str:
        if not SESSION_ID.fullmatch(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return f"{self.prefix}{session_id}/{name}"

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
            "pipeline_depth": session.pipeline_depth,
        }
        self.store.write(self._key(session.session_id, "session.json"), json.dumps(meta).encode())

    def save_state(self, session_id: str, state: checkpoint.TrainingState) -> None:
        self.store.write(self._key(session_id, _step_name(state.step)), checkpoint.to_bytes(state))
        # Step 0 (the common ground of last resort) and the newest few stay.
        steps = self._steps(session_id)
        for step in steps[: -checkpoint.KEEP_CHECKPOINTS]:
            if step != 0:
                self.store.delete(self._key(session_id, _step_name(step)))

    def _names(self, session_id: str) -> list[str]:
        folder = self._key(session_id)
        return [key[len(folder) :] for key in self.store.list(folder)]

    def _steps(self, session_id: str) -> list[int]:
        return sorted(int(m[1]) for n in self._names(session_id) if (m := _STEP.fullmatch(n)))

    def exists(self, session_id: str) -> bool:
        return self.store.read(self._key(session_id, "session.json")) is not None

    def remove(self, session_id: str) -> None:
        """Delete the session's objects (only ours); a folder holding others stays."""
        for name in self._names(session_id):
            if _OURS.fullmatch(name):
                self.store.delete(self._key(session_id, name))

    def load_all(self, teachers: TeacherVersions) -> list[Session]:
        """Every session on disk that this cloud's teacher (at its version) can go on serving.

        A damaged session (no readable metadata, no intact checkpoint) is
        removed with one line; one trained against another teacher is kept
        for a cloud that has that teacher.
        """
        ids = sorted(
            {key[len(self.prefix) :].split("/", 1)[0] for key in self.store.list(self.prefix)}
        )
        sessions = []
        for session_id in filter(SESSION_ID.fullmatch, ids):
            restored = self.load(session_id, teachers)
            if restored is not None:
                sessions.append(restored)
        return sessions

    def load(self, session_id: str, teachers: TeacherVersions) -> Session | None:
        """The session from storage, or None (absent, or not restorable by this cloud)."""
        try:
            return self._load(session_id, teachers)
        except FileNotFoundError:
            return None
        except Unrestorable as exc:
            self.remove(session_id)
            log.warning("session %s… cannot be restored (%s); removed", session_id[:8], exc)
        except (SplitKDError, OSError, ValueError, KeyError, RuntimeError) as exc:
            if getattr(exc, "status", "") == "UNAVAILABLE":
                raise  # the store is down: the caller retries, nothing is removed
            log.warning("session %s… not restored: %s", session_id[:8], exc)
        return None

    def _load(self, session_id: str, teachers: TeacherVersions) -> Session:
        raw = self.store.read(self._key(session_id, "session.json"))
        if raw is None:
            if not self._names(session_id):
                raise FileNotFoundError(session_id)
            raise Unrestorable("it has no session.json")
        try:
            meta: dict[str, Any] = json.loads(raw)
            spec = ModelSpec.from_json(meta["teacher"]["family"], meta["teacher"]["spec"])
        except (ValueError, KeyError, TypeError, SplitKDError) as exc:
            raise Unrestorable(f"session.json is unreadable: {exc}") from None
        if meta.get("session_id") != session_id:
            raise Unrestorable("session.json names another session")
        if meta.get("finished_version") is not None:
            raise Unrestorable("it finished; its student is published")
        if not meta.get("trained") and self._steps(session_id) in ([], [0]):
            raise Unrestorable("it never trained (saved at registration by an older splitkd)")
        # The session goes on against the server-model version it started with.
        teacher = teachers.get(int(meta.get("teacher_version", 1)))  # FailedPrecondition: kept
        teacher_spec = teacher.spec
        if spec != teacher_spec:
            raise ValueError("it was trained against another teacher")
        try:
            return self._session(meta, teacher_spec, teacher)
        except (SplitKDError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise Unrestorable(str(exc)) from None

    def _session(self, meta: dict[str, Any], teacher_spec: ModelSpec, teacher: Teacher) -> Session:
        student_spec = ModelSpec.from_json(meta["student"]["family"], meta["student"]["spec"])
        hyper = _hyper(meta["hyper"])
        student = zoo.build(student_spec, hyper.seed)
        capacity = int(meta.get("teacher_cache_samples", 0))
        states = self._intact_states(meta["session_id"], student)
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
            pipeline_depth=int(meta.get("pipeline_depth", 1)),
        )
        session.load(states[max(states)])  # live = newest; older ones stay restorable
        return session

    def _intact_states(
        self, session_id: str, student: StagedModel
    ) -> dict[int, checkpoint.TrainingState]:
        """The checkpoints that can be loaded, by step: a torn object, or one whose content
        is another step's or another model's, is skipped (older ones still serve)."""
        expected = {name: tuple(t.shape) for name, t in student.state_dict().items()}
        states = {}
        for step in self._steps(session_id):
            raw = self.store.read(self._key(session_id, _step_name(step)))
            try:
                state = checkpoint.from_bytes(raw or b"", f"step {step}")
            except SplitKDError as exc:
                log.warning("%s: ignoring the checkpoint of step %d: %s", session_id[:8], step, exc)
                continue
            shapes = {name: tuple(t.shape) for name, t in state.model.items()}
            if state.step != step or shapes != expected:
                log.warning(
                    "%s: ignoring the checkpoint of step %d: it holds %s",
                    session_id[:8],
                    step,
                    f"step {state.step}" if state.step != step else "another model",
                )
                continue
            states[step] = state
        return states


def _hyper(saved: dict[str, Any]) -> Hyperparameters:
    """Hyperparameters as saved; folders of versions before the wire codecs had wire_dtype."""
    saved = dict(saved)
    if "wire_dtype" in saved:
        saved.setdefault("wire_codec", saved.pop("wire_dtype"))
    return Hyperparameters(**saved)


def _step_name(step: int) -> str:
    return f"step-{step:09d}.safetensors"
