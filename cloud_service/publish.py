"""Publish the server model (the teacher) in the model registry as ``teacher``.

Version 1 as soon as the cloud is ready, a new registry version after each
server-model update, so an operator can fetch and inspect it like a student
(ONNX, checked against PyTorch, SHA-256).
"""

from __future__ import annotations

import logging
from typing import Any

from splitkd.errors import SplitKDError
from splitkd.models import zoo
from splitkd.onnx_export import export_checked

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
    with service.export_lock:
        onnx_bytes, diff = export_checked(teacher.model, teacher.spec.input_shape)
        record = service.registry.publish(
            TEACHER_MODEL_NAME,
            onnx_bytes,
            parameters=zoo.parameter_count(teacher.spec),
            max_abs_diff=diff,
            input_shape=list(teacher.spec.input_shape),
            num_classes=teacher.spec.num_classes,
            teacher_version=teacher.version,
        )
    log.info("server model v%d published as %s v%d", teacher.version, record.name, record.version)
    return int(record.version)
