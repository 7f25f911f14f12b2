"""Cohorts of several replicas: checkpoints in the shared store, one owner per cohort.

A cohort's state (round, members, pending updates, students, server-model
version) is checkpointed under ``cohorts/NAME/`` of the replicas' shared store
(``--store``: a folder or S3) at every change, and its lease
(``cohorts/NAME/lease-G``, :mod:`cloud_service.leases`) says which replica runs
its rounds. Members send the cohort's name as their routing key, so they all
meet on that replica. When it dies, the cohort's next call lands on another
replica, which:

1. answers UNAVAILABLE (the edge retries) until the old holder's lease ran out;
2. takes the lease and restores the cohort from the shared checkpoint, after
   looking up the newest server-model version (``teacher_store.py``);
3. goes on: an update the old holder had taken is in the restored pending set
   (a device that sends it again is told "duplicate"), one it had not taken
   is sent again by the device. Nothing is applied twice.

A call that names a member, not a cohort (FetchRound, SubmitUpdate), finds its
cohort through ``cohorts/_members/MEMBER`` written at the member's join.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from cloud_service.fleet.cohort import Cohort
from cloud_service.fleet.store import CohortStore
from cloud_service.leases import Leases
from splitkd.errors import FailedPrecondition, SplitKDError, Unavailable

if TYPE_CHECKING:
    from cloud_service.fleet.service import FleetService

log = logging.getLogger(__name__)
PREFIX = "cohorts/"


class SharedCohorts:
    def __init__(self, store: CohortStore, leases: Leases) -> None:
        self.store = store
        self.leases = leases
        self._lock = threading.Lock()  # one restore at a time, however many calls race

    def held(self, fleet: FleetService, name: str) -> Cohort | None:
        """The cohort, held by this replica (taking it over when it is free); None when
        it has no checkpoint (a new one: the caller creates it, holding its lease)."""
        here = fleet.peek(name)
        if here is not None and self.leases.held(name):
            # Every member's poll comes here: no storage call while the lease runs
            # (renew() keeps it, and forgets a cohort whose lease changed hands).
            return here
        with self._lock:
            here = fleet.peek(name)
            if here is not None:
                if not self.leases.holds(name):
                    fleet.forget(name)
                    raise Unavailable(f"cohort {name} moved to another replica; try again shortly")
                if not self.leases.taken_from_other(name):
                    return here
                # Back after another replica ran it: its checkpoint is newer than our memory.
                fleet.forget(name)
            elif not self.leases.holds(name):
                raise Unavailable(f"cohort {name} is served by another replica; try again shortly")
            self.leases.taken_from_other(name)  # loaded fresh now: nothing stale
            return self._restore(fleet, name)

    def _restore(self, fleet: FleetService, name: str) -> Cohort | None:
        try:
            loaded = self.store.load(name)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.error("cohort %s: its checkpoint cannot be restored (%s)", name, exc)
            raise FailedPrecondition(
                f"cohort {name}'s checkpoint cannot be restored; ask the operator"
            ) from None
        if loaded is None:
            return None
        cohort, state = loaded
        # The server-model versions its rounds made on the old holder, before its next round.
        teacher = fleet.split.teachers.refresh()
        fleet.adopt_restored(cohort, state)
        log.info(
            "cohort %s taken over at round %d (%d members, %d updates pending, server model v%d)",
            name,
            cohort.round,
            len(cohort.members),
            len(cohort.pending),
            teacher.version,
        )
        return cohort

    def still_ours(self, fleet: FleetService, cohort: Cohort) -> bool:
        """Before a closed round is applied (callers hold ``cohort.lock``)."""
        try:
            # Taken back after another replica ran it: what this close started from is stale.
            if (
                self.leases.holds(cohort.name)
                and not self.leases.taken_from_other(cohort.name)
                and fleet.peek(cohort.name) is cohort
            ):
                return True
        except SplitKDError as exc:
            log.warning("cohort %s: lease not renewed (%s)", cohort.name, exc)
        cohort.aggregating = False
        fleet.forget(cohort.name)
        log.warning("cohort %s moved to another replica while its round closed here", cohort.name)
        return False

    def renew(self, fleet: FleetService) -> None:
        """Keep the leases of the cohorts held here (every half-second, from serve)."""
        for name in fleet.held_names():
            try:
                # Taken back after another replica ran it: the next call restores it fresh.
                kept = self.leases.holds(name) and not self.leases.taken_from_other(name)
            except SplitKDError as exc:  # the store is down: the replica reports not-ready
                log.warning("cohort %s: lease not renewed (%s)", name, exc)
                continue
            if not kept:
                fleet.forget(name)
                log.warning("cohort %s: its lease changed hands; forgotten here", name)

    def release_all(self) -> None:
        for name in self.leases.owned():
            try:
                self.leases.release(name)
            except SplitKDError as exc:
                log.warning("cohort %s: lease not released (%s)", name, exc)
