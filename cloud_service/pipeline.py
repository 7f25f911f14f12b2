"""A step that arrives a little ahead of its turn waits for it (bounded).

An edge that pipelines (``splitkd-edge train --pipeline-depth N``) sends step
k + 1 before step k's answer is back; both calls may reach the cloud's worker
threads in either order. Rather than refuse k + 1 as out of order, its thread
waits (releasing the session's lock) until step k is applied, for at most
``WAIT_SECONDS``; then the usual out-of-order error follows. A step further ahead
than any edge pipelines is refused at once, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from splitkd.errors import InvalidArgument

if TYPE_CHECKING:
    from cloud_service.session import Session

# The edge allows at most 4 steps in flight (edge_agent/settings.py): 3 ahead.
MAX_AHEAD = 3
# Long against a step on any link the testbed shapes, short against a session's life.
WAIT_SECONDS = 10.0


def check_depth(depth: int) -> int:
    if not 1 <= depth <= MAX_AHEAD + 1:
        raise InvalidArgument(f"pipeline_depth must be in 1..{MAX_AHEAD + 1}, got {depth}")
    return depth


def wait_turn(session: Session, step: int) -> None:
    """Called with ``session.lock`` held; returns when ``step`` is the next or may be refused.

    Only a session whose edge said it pipelines waits, and only as far ahead as it said:
    any other early step is refused at once, so no peer holds a worker thread for nothing.
    """
    if 0 < step - session.next_step < session.pipeline_depth:
        session.turn.wait_for(lambda: session.next_step >= step, timeout=WAIT_SECONDS)


def turn_taken(session: Session) -> None:
    """A step was applied (or the session rolled back): wake the steps waiting for theirs."""
    session.turn.notify_all()
