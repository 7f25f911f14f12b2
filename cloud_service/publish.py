"""Publish the server model (the teacher) in the model registry as ``teacher``.

Version 1 as soon as the cloud is ready, a new registry version after each
server-model update, so an operator can fetch and inspect it like a student
(ONNX, checked against PyTorch, SHA-256).
"""

from __future__ import annotations

import logging
from typing import Any

from splitkd.errors import SplitKDError

log = logging.getLogger(__name__)
TEACHER_MODEL_NAME = "teacher"


def publish_teacher(service: Any) -> int:
    """Publish the current server model unless its version is already there; returns the registry version."""
    teacher = service.teachers.current()
    try:
        latest = service.registry.get(TEACHER_MODEL_NAME)
        if latest.teacher_version == teacher.version:
            return int(latest.version)
    except SplitKDError:
        pass  # nothing published yet
    record = service.publish_model(
        TEACHER_MODEL_NAME, teacher.model, teacher.spec, teacher_version=teacher.version
    )
    log.info("server model v%d published as %s v%d", teacher.version, record.name, record.version)
    return int(record.version)
