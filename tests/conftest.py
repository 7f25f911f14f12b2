"""Fixtures shared by the whole suite (helpers live in tests/support.py)."""

from tests.support import digits_teacher_file, live_cloud

__all__ = ["digits_teacher_file", "live_cloud"]
