"""The server model's versions in the replicas' shared store (``--store``).

One cloud keeps them in ``STATE_DIR/teacher-versions`` (:class:`TeacherVersions`).
Replicas keep them where every replica reads them, under ``teacher-versions/``
of the shared folder or S3 bucket, in the same layout: ``vN.safetensors``,
its provenance ``vN.json``, and ``CURRENT.json`` naming the version served. So
the replica that takes a federated cohort over goes on from the newest
server-model version, not from version 1, and a session trained against a
version another replica made can be restored anywhere.

A version number is taken with a conditional create: two replicas updating
at once get two numbers, never one overwritten. The pointer is looked at
again at most every ``recheck_seconds`` (one small read); a cohort or a
session restored here looks at once (:meth:`refresh`, :meth:`get`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable

from cloud_service.storage import RetryingStore
from cloud_service.teacher import Teacher, TeacherVersions
from splitkd.errors import FailedPrecondition, SplitKDError
from splitkd.models.staged import StagedModel

log = logging.getLogger(__name__)
PREFIX = "teacher-versions/"
_VERSION = re.compile(r"^v(\d+)\.safetensors$")
_NUMBER_ATTEMPTS = 20  # versions other replicas may take between our look and our create


class SharedTeacherVersions(TeacherVersions):
    def __init__(
        self,
        first: Teacher,
        store: RetryingStore,
        *,
        prefix: str = PREFIX,
        recheck_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(first)
        self.store = store
        # Periodic looks ask once, without retries: a store that is down must not stall
        # every caller of current() (they keep the version they have).
        self._quick = RetryingStore(store.inner, attempts=1)
        self.prefix = prefix
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._first = first
        self._looked = float("-inf")
        self._skipped: set[int] = set()
        with self._lock:
            self._sync(self.store)
        if self._current is not first:
            log.info("server model at version %d (shared store)", self._current.version)

    # -- reading ---------------------------------------------------------------
    def current(self) -> Teacher:
        with self._lock:
            before = self._current
            self._follow_pointer()
            now = self._current
        if now is not before:
            self._announce(now)
        return now

    def refresh(self) -> Teacher:
        with self._lock:
            before = self._current
            self._sync(self.store)
            now = self._current
        if now is not before:
            self._announce(now)
        return now

    def get(self, version: int) -> Teacher:
        with self._lock:
            if version not in self._versions and version in self._listed(self.store):
                self._fetch(self.store, version)
        return super().get(version)

    def made_for(self, purpose: str) -> Teacher | None:
        """As for one cloud, over every replica's updates (their provenance is small;
        only a matching version's weights are read)."""
        with self._lock:
            for version in self._listed(self.store):
                if version not in self._provenance:
                    self._provenance[version] = self._read_provenance(self.store, version)
                if self._provenance[version].get("made_for") == purpose:
                    self._fetch(self.store, version)
        return super().made_for(purpose)

    def _follow_pointer(self) -> None:
        if self._clock() - self._looked < self.recheck_seconds:
            return
        try:
            self._sync(self._quick)
        except SplitKDError as exc:
            log.warning(
                "server model versions not looked at (%s); v%d stays", exc, self._current.version
            )

    def _announce(self, teacher: Teacher) -> None:
        """Another replica's version is served here now: tell whoever follows updates."""
        log.info("server model version %d taken up from the shared store", teacher.version)
        for callback in self.on_update:
            callback(teacher)

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _listed(self, store: RetryingStore) -> list[int]:
        names = (key[len(self.prefix) :] for key in store.list(self.prefix))
        return sorted(int(m[1]) for n in names if (m := _VERSION.fullmatch(n)))

    def _pointer(self, store: RetryingStore) -> int | None:
        try:
            value = json.loads(store.read(self._key("CURRENT.json")) or b"null")
            value = value.get("version") if isinstance(value, dict) else None
        except ValueError:
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def _sync(self, store: RetryingStore) -> None:
        """Serve the version the shared pointer names (callers hold the lock)."""
        self._looked = self._clock()
        pointed = self._pointer(store)
        if pointed is None:
            # No update yet (or none that reached its pointer): the newest whole one.
            listed = [v for v in self._listed(store) if v not in self._versions]
            for version in listed:
                self._fetch(store, version)
            pointed = max(self._versions)
        if pointed not in self._versions:
            self._fetch(store, pointed)
        if pointed in self._versions and pointed != self._current.version:
            self._current = self._versions[pointed]

    def _fetch(self, store: RetryingStore, version: int) -> None:
        """Load one version from the store (callers hold the lock); a damaged or foreign
        one is left out with one line."""
        key = self._key(f"v{version}.safetensors")
        if version in self._versions or version in self._skipped:
            return
        raw = store.read(key)
        if raw is None:
            return
        try:
            saved = Teacher.from_bytes(raw, key)
        except SplitKDError as exc:
            saved = None
            log.warning("%s: %s; not restored", key, exc)
        if saved is not None and saved.spec != self._first.spec:
            saved = None
            log.warning("%s: another teacher architecture; not restored", key)
        if saved is None:
            self._skipped.add(version)  # said once, not at every look
            return
        saved.version, saved.data_name = version, self._first.data_name
        self._versions[version] = saved
        self._provenance[version] = self._read_provenance(store, version)

    def _read_provenance(self, store: RetryingStore, version: int) -> dict[str, object]:
        try:
            provenance = json.loads(store.read(self._key(f"v{version}.json")) or b"{}")
        except ValueError:
            return {}
        return provenance if isinstance(provenance, dict) else {}

    # -- writing -----------------------------------------------------------------
    def update(
        self,
        model: StagedModel,
        accuracy: float | None = None,
        provenance: dict[str, object] | None = None,
    ) -> Teacher:
        """The next version, numbered past every version any replica made."""
        model.eval()
        with self._lock:
            self._sync(self.store)
            old = self._current
            if self._pointer(self.store) is None:
                # Name the serving version first: a replica that dies between the weights
                # and the pointer leaves a version no one takes for current.
                self._write_pointer(old.version)
            number = max([*self._versions, *self._listed(self.store)]) + 1
            new = Teacher(old.spec, model, accuracy, old.data_name, dict(old.samples), number)
            data = new.to_bytes()
            for _ in range(_NUMBER_ATTEMPTS):
                if self.store.create(self._key(f"v{number}.safetensors"), data):
                    break
                number += 1  # another replica took it meanwhile
            else:
                raise FailedPrecondition("no free server-model version number; try again")
            new.version = number
            if provenance is not None:
                self.store.write(self._key(f"v{number}.json"), json.dumps(provenance).encode())
            if (self._pointer(self.store) or 0) < number:
                self._write_pointer(number)
            self._versions[number] = new
            self._provenance[number] = dict(provenance or {})
            self._current = new
        log.info("server model updated to version %d (shared store)", new.version)
        for callback in self.on_update:
            callback(new)
        return new

    def rollback(self, version: int) -> Teacher:
        with self._lock:
            if version not in self._versions:
                self._fetch(self.store, version)
            if version not in self._versions:
                raise FailedPrecondition(
                    f"teacher version {version} is not available (have {sorted(self._versions)})"
                )
            self._write_pointer(version)
            self._current = self._versions[version]
        log.info("server model rolled back to version %d (shared store)", version)
        return self._current

    def _write_pointer(self, version: int) -> None:
        self.store.write(self._key("CURRENT.json"), json.dumps({"version": version}).encode())
