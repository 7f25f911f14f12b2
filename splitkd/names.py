"""The names splitkd accepts from peers, users and files, defined once.

Device ids, model names and cohort names end up in file paths, metric labels
and log lines, so they are plain: letters, digits, ``.``, ``_``, ``-``,
starting with a letter or digit (never ``..``, ``/`` or a control character).
"""

from __future__ import annotations

import re

_PLAIN = "[A-Za-z0-9][A-Za-z0-9._-]"
DEVICE_ID_PATTERN = rf"^{_PLAIN}{{0,63}}$"
MODEL_NAME_PATTERN = rf"^{_PLAIN}{{0,127}}$"
# "cohort-NAME-CLASS" must stay a valid model name.
COHORT_NAME_PATTERN = rf"^{_PLAIN}{{0,47}}$"

# In the FAILED_PRECONDITION of a step naming samples whose teacher outputs the
# cloud does not hold (cloud_service/teacher_cache.py): the edge sends them again.
TEACHER_CACHE_MISS = "teacher-cache-miss"

DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
COHORT_NAME = re.compile(COHORT_NAME_PATTERN)


def is_device_id(text: str) -> bool:
    return DEVICE_ID.fullmatch(text) is not None


def is_model_name(text: str) -> bool:
    return MODEL_NAME.fullmatch(text) is not None


def is_cohort_name(text: str) -> bool:
    return COHORT_NAME.fullmatch(text) is not None
