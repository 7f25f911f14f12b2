"""The model registry in the replicas' shared store (S3): every replica serves every model.

Keys, under the store's prefix: ``models/NAME/VERSION/{claim,model.onnx,metadata.json}``.

- A version number is taken with the store's conditional create of its ``claim``
  (``If-None-Match: *``): of two replicas publishing one name at once, one gets the
  number and the other tries the next, so no two replicas publish the same version.
- The model is uploaded before its metadata, and only a version with metadata is
  published: a reader never sees a half-published version. The metadata records the
  model's sha256, which every fetch checks.
- ``path()`` hands out a local copy in ``cache`` (the replica's state folder), fetched on
  first use and checked against that sha256: a damaged or missing object is refused
  (UNAVAILABLE / HTTP 503), never served as a model.

Pruning keeps the newest ``keep_versions``, as the folder registry does; a pruned
version loses its metadata first (readers stop seeing it), then its model and claim.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from datetime import UTC, datetime
from pathlib import Path

from cloud_service.registry import (
    DEFAULT_KEEP_VERSIONS,
    ModelRecord,
    ModelRegistry,
    check_name,
    model_not_found,
)
from cloud_service.storage import Store
from splitkd import names
from splitkd.atomic import write_bytes_atomic
from splitkd.errors import NotFound, Unavailable

log = logging.getLogger(__name__)
PREFIX = "models/"
_META, _MODEL, _CLAIM = "metadata.json", "model.onnx", "claim"
# A local copy is named by its sha256: a bucket emptied and refilled (versions counted
# again from 1) can never have a replica serve an old copy under a new record.
_COPY = re.compile(r"^[0-9a-f]{64}\.onnx$")


class StoreRegistry(ModelRegistry):
    """:class:`ModelRegistry`'s interface over a :class:`Store`; ``cache``: local copies."""

    def __init__(
        self, store: Store, cache: Path, keep_versions: int = DEFAULT_KEEP_VERSIONS
    ) -> None:
        super().__init__(cache, keep_versions)
        self.store = store
        self.claimant = f"{socket.gethostname()}-{os.getpid()}".encode()

    def _key(self, name: str, version: int, file: str) -> str:
        return f"{PREFIX}{name}/{version}/{file}"

    def _listing(self, name: str) -> tuple[list[int], int]:
        """The published versions, and the highest number claimed or published."""
        published, highest = [], 0
        for key in self.store.list(f"{PREFIX}{name}/"):
            parts = key[len(PREFIX) :].split("/")
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            highest = max(highest, int(parts[1]))
            if parts[2] == _META:
                published.append(int(parts[1]))
        return sorted(published), highest

    def _versions(self, name: str) -> list[int]:
        return self._listing(name)[0]

    def _publish_once(
        self, name: str, onnx_bytes: bytes, meta: dict[str, object]
    ) -> ModelRecord | None:
        version = self._listing(name)[1] + 1
        if not self.store.create(self._key(name, version, _CLAIM), self.claimant):
            return None  # another replica took this number first
        if self._versions(name)[-1:] > [version]:
            # Our look was older than a pruning that removed this number's claim: a
            # newer version exists, so this number must not come back. Take another.
            self.store.delete(self._key(name, version, _CLAIM))
            return None
        record = ModelRecord(
            name=name,
            version=version,
            sha256=hashlib.sha256(onnx_bytes).hexdigest(),
            size_bytes=len(onnx_bytes),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            **meta,  # type: ignore[arg-type]
        )
        self.store.write(self._key(name, version, _MODEL), onnx_bytes)
        # The metadata last: its presence is what publishes the version.
        self.store.write(self._key(name, version, _META), json.dumps(record.to_dict()).encode())
        return record

    def _prune(self, name: str) -> None:
        if not self.keep_versions:
            return
        for version in self._versions(name)[: -self.keep_versions]:
            for file in (_META, _MODEL, _CLAIM):
                self.store.delete(self._key(name, version, file))

    def versions(self, name: str) -> list[ModelRecord]:
        # One listing for all (the base class lists once per version).
        records = []
        for version in self._versions(check_name(name)):
            try:
                records.append(self.get_published(name, version))
            except NotFound:
                continue  # pruned since the listing
        return records

    def names(self) -> list[str]:
        found = set()
        for key in self.store.list(PREFIX):
            parts = key[len(PREFIX) :].split("/")
            if len(parts) == 3 and parts[2] == _META and names.is_model_name(parts[0]):
                found.add(parts[0])
        return sorted(found)

    def get(self, name: str, version: int = 0) -> ModelRecord:
        check_name(name)
        if version:  # one read: a version's metadata exists only once it is whole
            return self.get_published(name, version)
        versions = self._versions(name)
        if not versions:
            raise model_not_found(name, version)
        return self.get_published(name, versions[-1])

    def get_published(self, name: str, version: int) -> ModelRecord:
        """The record of a published version (NotFound if there is none, or pruned)."""
        raw = self.store.read(self._key(name, version, _META))
        if raw is None:  # pruned between the listing and the read
            raise model_not_found(name, version)
        try:
            record = ModelRecord(**json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise _damaged(name, version, "its metadata does not parse") from exc
        if record.name != name or record.version != version:
            raise _damaged(name, version, "its metadata names another model")
        return record

    def path(self, name: str, version: int = 0) -> Path:
        record = self.get(name, version)
        local = self.root / name / str(record.version) / f"{record.sha256}.onnx"
        if local.is_file():
            return local  # written here only after its sha256 matched
        data = self.store.read(self._key(name, record.version, _MODEL))
        if data is None:
            if record.version not in self._versions(name):
                raise model_not_found(name, record.version)  # pruned meanwhile
            raise _damaged(name, record.version, "its model object is missing")
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise _damaged(name, record.version, "its model does not match its sha256")
        local.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(local, data)
        self._forget_pruned(name, record.version)
        return local

    def _forget_pruned(self, name: str, fetched: int) -> None:
        """Drop local copies of versions no longer published (only the files we wrote)."""
        if not self.keep_versions:
            return
        published = set(self._versions(name)) | {fetched}
        for folder in (self.root / name).iterdir():
            if folder.name.isdigit() and int(folder.name) not in published:
                for copy in folder.iterdir():
                    if _COPY.fullmatch(copy.name):
                        copy.unlink(missing_ok=True)
                try:
                    folder.rmdir()
                except OSError:
                    log.warning("kept %s for the files splitkd did not write", folder)


def _damaged(name: str, version: int, why: str) -> Unavailable:
    log.error("model %s v%d in the shared store is damaged: %s", name, version, why)
    return Unavailable(f"model {name!r} version {version} cannot be served now: {why}")
