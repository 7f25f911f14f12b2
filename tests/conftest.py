"""Fixtures shared by the whole suite (helpers live in tests/support.py)."""

from tests.support import live_cloud

__all__ = ["live_cloud"]
