"""The one logging configuration point for both command-line programs."""

from __future__ import annotations

import logging
import os


def configure(verbose: int = 0) -> None:
    """Log to stderr; ``SPLITKD_LOG_LEVEL`` or ``-v`` raise the detail."""
    level_name = os.environ.get("SPLITKD_LOG_LEVEL", "")
    level = getattr(logging, level_name.upper(), None) if level_name else None
    if not isinstance(level, int):
        level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
