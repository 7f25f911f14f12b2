"""The cloud's half of the DiReDi loop: base students, knowledge reports, teacher updates.

``distil`` makes a student from the current teacher on the cloud's presumed data
and publishes it through :meth:`CloudService.publish_model` (its weights are kept
beside, so a device can later adapt from them). ``open`` hands a device the
installed student's weights and the probe inputs; ``report`` takes the adapted
model's logits on those probes, reverse-distils them into a candidate teacher,
keeps it only if the guardrail holds, and re-distils a student for the device.
Every check runs before the teacher is touched.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from prometheus_client import Counter
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from cloud_service.registry import ModelRecord, check_name
from cloud_service.service import CloudService, CohortStudent
from splitkd import names, rediredi
from splitkd.atomic import write_bytes_atomic
from splitkd.data.partition import EdgeSplit
from splitkd.errors import FailedPrecondition, InvalidArgument, NotFound
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel

log = logging.getLogger(__name__)
DEFAULT_MARGIN = 0.02  # the default: at most 2 points of presumed accuracy lost
# Open tasks hold their probes in memory; beyond this many the oldest is forgotten.
MAX_OPEN_TASKS = 64


def adapted_name(device_id: str) -> str:
    """The model name under which a device's re-distilled students are published."""
    return f"adapted-{device_id}"


@dataclass(frozen=True)
class Task:
    adaptation_id: str
    device_id: str
    model_name: str
    model_version: int
    spec: ModelSpec
    state: dict[str, np.ndarray]
    probes: np.ndarray
    teacher_version: int


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    reason: str
    teacher_before: int
    teacher_after: int
    presumed_before: float
    presumed_after: float
    margin: float
    heldout_samples: int
    probe_agreement: float
    student: ModelRecord | None = None
    cohort_students: tuple[ModelRecord, ...] = ()


class StudentWeights:
    """Safetensors weights of the students the cloud distilled: ``ROOT/NAME/VERSION.safetensors``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str, version: int) -> Path:
        return self.root / check_name(name) / f"{int(version)}.safetensors"

    def save(self, record: ModelRecord, spec: ModelSpec, model: StagedModel) -> None:
        path = self.path(record.name, record.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        metadata = {"family": spec.family, "spec": spec.to_json(), "sha256": record.sha256}
        write_bytes_atomic(path, save(state, metadata=metadata))

    def load(self, name: str, version: int, sha256: str) -> tuple[ModelSpec, StagedModel]:
        path = self.path(name, version)
        refused = FailedPrecondition(
            f"model {name} v{version} was not distilled by this cloud (or that version is gone): "
            "adapt starts from a student of 'splitkd-cloud distill' or of an earlier adapt"
        )
        if not path.is_file():
            raise refused
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise FailedPrecondition(
                f"the weights of {name} v{version} are damaged ({exc})"
            ) from exc
        if metadata.get("sha256") != sha256:
            raise FailedPrecondition(
                f"the device's {name} v{version} is not the one this cloud published "
                "(SHA-256 differs): pull it again"
            )
        spec = ModelSpec.from_json(metadata["family"], metadata["spec"])
        model = zoo.build(spec)
        model.load_state_dict(state)
        model.eval()
        return spec, model


@dataclass
class LifecycleSettings:
    margin: float = DEFAULT_MARGIN
    loop: rediredi.LoopSettings = field(default_factory=rediredi.LoopSettings)


class Lifecycle:
    def __init__(
        self,
        service: CloudService,
        presumed: EdgeSplit,
        weights: StudentWeights,
        settings: LifecycleSettings | None = None,
    ) -> None:
        self.service = service
        self.presumed = presumed
        self.weights = weights
        self.settings = settings or LifecycleSettings()
        if not 0.0 <= self.settings.margin <= 1.0:
            raise InvalidArgument(f"guardrail margin must be in [0, 1], got {self.settings.margin}")
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._lock = threading.Lock()
        # One teacher update at a time: each starts from the version the last one made.
        self._update_lock = threading.Lock()
        registry = service.metrics.registry
        self.adaptations = Counter(
            "splitkd_cloud_adaptations",
            "Device adaptations whose knowledge report was received and checked",
            registry=registry,
        )
        self.updates = Counter(
            "splitkd_cloud_teacher_updates",
            "Teacher updates from knowledge reports, by outcome (accepted or refused by the guardrail)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("accepted", "refused"):
            self.updates.labels(outcome=outcome)

    def distil(self, name: str) -> ModelRecord:
        """A student of the current teacher on the presumed data, published as ``name``."""
        check_name(name)
        teacher = self.service.teachers.current()
        data = self.presumed.train
        student = rediredi.distil_on_presumed(
            teacher.model, self.service.student_spec, data.x, data.y, self.settings.loop
        )
        record = self._publish(name, self.service.student_spec, student, teacher.version, "")
        log.info(
            "%s v%d distilled from teacher v%d on %d presumed samples: presumed accuracy %.4f",
            name,
            record.version,
            teacher.version,
            len(data),
            rediredi.accuracy(student, self.presumed.heldout.x, self.presumed.heldout.y),
        )
        return record

    def _publish(
        self, name: str, spec: ModelSpec, model: StagedModel, teacher_version: int, device: str
    ) -> ModelRecord:
        record = self.service.publish_model(
            name, model, spec, device_id=device, teacher_version=teacher_version
        )
        self.weights.save(record, spec, model)
        self.service.metrics.models_published.inc()
        return record

    def open(self, device_id: str, name: str, version: int, sha256: str) -> Task:
        self.service.check_device(device_id)
        if not names.is_model_name(name) or version < 1:
            raise InvalidArgument("model_name and model_version must name the installed student")
        record = self.service.registry.get(name, version)
        if record.device_id and record.device_id != device_id:
            raise NotFound(f"no model {name!r} version {version} here")
        spec, model = self.weights.load(name, version, sha256)
        teacher = self.service.teachers.current()
        seed = secrets.randbits(31)
        probes = rediredi.probe_inputs(
            self.presumed.train.x, self.settings.loop.probes_per_shift, seed
        )
        state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        task = Task(
            secrets.token_hex(16), device_id, name, version, spec, state, probes, teacher.version
        )
        with self._lock:
            self._tasks[task.adaptation_id] = task
            while len(self._tasks) > MAX_OPEN_TASKS:
                self._tasks.popitem(last=False)
        log.info(
            "adaptation %s… opened for %s on %s v%d",
            task.adaptation_id[:8],
            device_id,
            name,
            version,
        )
        return task

    def task(self, adaptation_id: str, device_id: str) -> Task:
        with self._lock:
            task = self._tasks.get(adaptation_id)
        if task is None or task.device_id != device_id:
            raise NotFound("no open adaptation with that id here: call OpenAdaptation again")
        return task

    def check_report(self, task: Task, name: str, version: int, logits: np.ndarray) -> None:
        """Refuse a report that does not answer this task (the teacher stays untouched)."""
        if (name, version) != (task.model_name, task.model_version):
            raise FailedPrecondition(
                f"the report is about {name} v{version}, but the adaptation was opened for "
                f"{task.model_name} v{task.model_version}: open a new adaptation for the installed model"
            )
        expected = (len(task.probes), task.spec.num_classes)
        if logits.shape != expected:
            raise InvalidArgument(
                f"probe_logits: shape {list(logits.shape)} is not {list(expected)}"
            )
        if not np.isfinite(logits).all():
            raise InvalidArgument("probe_logits: contains NaN or Inf")

    def cohort_students(self, device_id: str, cohort: str) -> list[CohortStudent]:
        """A finished cohort's students to re-distil with the new teacher; the device must be
        a member (checked before the teacher is touched)."""
        if not names.is_cohort_name(cohort):
            raise InvalidArgument(f"cohort {cohort[:60]!r} is not a cohort name")
        member, students = self.service.cohort_member, self.service.cohort_students
        if member is None or students is None:
            raise FailedPrecondition("this cloud runs no fleets: there is no cohort to re-distil")
        if not member(cohort, device_id):
            raise NotFound(f"no cohort {cohort!r} with this device as a member")
        return students(cohort)

    def report(
        self,
        task: Task,
        logits: np.ndarray,
        num_samples: int,
        cohort: Sequence[CohortStudent] = (),
    ) -> Outcome:
        """Reverse-distil the report into a candidate teacher, keep it if the guardrail holds;
        then re-distil the device's student (and ``cohort``'s, when asked)."""
        self.adaptations.inc()
        with self._lock:
            self._tasks.pop(task.adaptation_id, None)  # answered once; a retry opens again
        with self._update_lock:
            outcome = self._update(task, logits.astype(np.float32), num_samples)
            if not outcome.accepted or not cohort:
                return outcome
            teacher = self.service.teachers.get(outcome.teacher_after)
            records = tuple(
                self._redistil_cohort(task, teacher.model, s, teacher.version) for s in cohort
            )
            return replace(outcome, cohort_students=records)

    def _redistil_cohort(
        self, task: Task, teacher: torch.nn.Module, student: CohortStudent, version: int
    ) -> ModelRecord:
        """A cohort class's next student: from the fleet's weights, taught by the new teacher."""
        model = self._distil_from(teacher, student.spec, student.weights, task.probes)
        record = student.publish(model, version)
        self.weights.save(record, student.spec, model)
        self.service.metrics.models_published.inc()
        log.info("%s v%d re-distilled from teacher v%d", record.name, record.version, version)
        return record

    def _update(self, task: Task, logits: np.ndarray, num_samples: int) -> Outcome:
        loop, held = self.settings.loop, self.presumed.heldout
        teacher = self.service.teachers.current()
        before = rediredi.accuracy(teacher.model, held.x, held.y)
        candidate = rediredi.update_teacher(
            teacher.model, self.presumed.train.x, self.presumed.train.y, task.probes, logits, loop
        )
        after = rediredi.accuracy(candidate, held.x, held.y)
        agreement = float(
            (rediredi.predict(candidate, task.probes).argmax(1) == logits.argmax(1)).mean()
        )
        refused = Outcome(
            False,
            "",
            teacher.version,
            teacher.version,
            before,
            after,
            self.settings.margin,
            len(held),
            agreement,
        )
        # A tolerance of one float ulp so that "exactly the margin" counts as within it.
        if before - after > self.settings.margin + 1e-9:
            self.updates.labels(outcome="refused").inc()
            reason = (
                f"guardrail: the updated teacher's accuracy on the held-out presumed data would "
                f"drop from {before:.4f} to {after:.4f}, more than the margin {self.settings.margin:.4f}"
            )
            log.warning("knowledge report of %s refused: %s", task.device_id, reason)
            return replace(refused, reason=reason)
        provenance = {
            "device_id": task.device_id,
            "adaptation_id": task.adaptation_id,
            "installed_model": f"{task.model_name} v{task.model_version}",
            "received_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "device_samples": num_samples,
            "probes": len(task.probes),
            "from_version": teacher.version,
            "presumed_accuracy_before": before,
            "presumed_accuracy_after": after,
            "margin": self.settings.margin,
        }
        new = self.service.teachers.update(candidate, after, provenance)
        self.updates.labels(outcome="accepted").inc()
        student = self._redistil(task, new.model, new.version)
        return replace(refused, accepted=True, teacher_after=new.version, student=student)

    def _distil_from(
        self,
        teacher: torch.nn.Module,
        spec: ModelSpec,
        state: dict[str, np.ndarray],
        probes: np.ndarray,
    ) -> StagedModel:
        """A student started from ``state``, taught by ``teacher`` on the presumed data and
        on the probes (where the new knowledge lives)."""
        start = zoo.build(spec)
        start.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        data = self.presumed.train
        return rediredi.distil_on_presumed(
            teacher, spec, data.x, data.y, self.settings.loop, transfer=probes, start=start
        )

    def _redistil(self, task: Task, teacher: torch.nn.Module, version: int) -> ModelRecord:
        """The device's next student: from its installed one, taught by the new teacher on
        the presumed data and the probes (where the new knowledge lives)."""
        student = self._distil_from(teacher, task.spec, task.state, task.probes)
        return self._publish(
            adapted_name(task.device_id), task.spec, student, version, task.device_id
        )
