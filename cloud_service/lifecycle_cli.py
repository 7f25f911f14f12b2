"""``splitkd-cloud distill`` and ``splitkd-cloud teacher list|rollback`` (DiReDi)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cloud_service.settings import (
    DistillSettings,
    ServeSettings,
    TeacherListSettings,
    TeacherRollbackSettings,
)
from splitkd.settings import Command

log = logging.getLogger(__name__)
TEACHER_FILE = "teacher.safetensors"
VERSIONS_FOLDER = "teacher-versions"


def presumed_split(data_spec: str, fraction: float | None) -> Any:
    """The cloud's presumed data (train and held-out), as the teacher was trained on it."""
    from splitkd.data import load_dataset
    from splitkd.data.partition import cloud_split, default_presumed_fraction

    if fraction is None:
        fraction = default_presumed_fraction(data_spec)
    return cloud_split(load_dataset(data_spec), fraction)


def build_lifecycle(service: Any, args: ServeSettings | DistillSettings, margin: float) -> Any:
    """The lifecycle service over ``service``; None when the presumed data does not fit the teacher."""
    from cloud_service.lifecycle import Lifecycle, LifecycleSettings, StudentWeights

    presumed = presumed_split(args.teacher_data, args.presumed_fraction)
    if presumed.train.signature.input_shape != service.teacher.signature.input_shape:
        log.warning(
            "the presumed data %s does not fit the teacher: no base students, no knowledge reports",
            args.teacher_data,
        )
        return None
    log.info(
        "lifecycle: presumed data %s (%d training, %d held-out samples), guardrail margin %.3f",
        args.teacher_data,
        len(presumed.train),
        len(presumed.heldout),
        margin,
    )
    weights = StudentWeights(args.state_dir / "student-weights")
    return Lifecycle(service, presumed, weights, LifecycleSettings(margin=margin))


def _distill(args: DistillSettings) -> int:
    from cloud_service.registry import ModelRegistry
    from cloud_service.service import CloudConfig, CloudService
    from cloud_service.sessions import SessionStore
    from cloud_service.teacher import Teacher, TeacherVersions
    from splitkd.errors import FailedPrecondition

    path = args.state_dir / TEACHER_FILE
    if not path.is_file():
        raise FailedPrecondition(f"no teacher in {args.state_dir}: run 'splitkd-cloud serve' first")
    teachers = TeacherVersions(Teacher.load(path), args.state_dir / VERSIONS_FOLDER)
    service = CloudService(
        teachers,
        ModelRegistry(args.state_dir / "models", keep_versions=args.keep_versions),
        SessionStore(),
        CloudConfig(),
    )
    lifecycle = build_lifecycle(service, args, 0.0)
    if lifecycle is None:
        raise FailedPrecondition(f"{args.teacher_data} does not fit this cloud's teacher")
    record = lifecycle.distil(args.name)
    print(
        f"{record.name} v{record.version}: distilled from teacher v{teachers.current().version} "
        f"on the presumed data, SHA-256 {record.sha256[:12]}…, {record.size_bytes} bytes"
    )
    return 0


def _teacher_list(args: TeacherListSettings) -> int:
    from cloud_service.teacher import version_history

    rows = version_history(args.state_dir / VERSIONS_FOLDER)
    if args.as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = "*" if row["current"] else " "
        origin = "trained on the presumed data"
        if "made_for" in row:  # a federated cohort's round (KOALA)
            origin = f"learnt from {row['made_for']}"
        if "device_id" in row:
            origin = (
                f"from {row['device_id']} at {row['received_at']}, presumed accuracy "
                f"{float(row['presumed_accuracy_before']):.4f} -> "  # type: ignore[arg-type]
                f"{float(row['presumed_accuracy_after']):.4f}"  # type: ignore[arg-type]
            )
        print(f"{mark} v{row['version']}: {origin}")
    return 0


def _teacher_rollback(args: TeacherRollbackSettings) -> int:
    from cloud_service.teacher import rollback_on_disk

    rollback_on_disk(Path(args.state_dir) / VERSIONS_FOLDER, args.version)
    print(f"teacher v{args.version} is current; a running cloud serves it to its next sessions")
    return 0


GROUP_HELP = {"teacher": "list the teacher's versions and their provenance, roll back"}
COMMANDS = (
    Command(
        "distill",
        DistillSettings,
        _distill,
        help="distil a student from the teacher on the presumed data and publish it",
    ),
    Command("teacher list", TeacherListSettings, _teacher_list, help="the teacher's versions"),
    Command(
        "teacher rollback",
        TeacherRollbackSettings,
        _teacher_rollback,
        help="serve an earlier teacher version again (at the cloud's next start)",
    ),
)
