"""Shared storage for replicas: one small interface, two backends.

Several ``splitkd-cloud serve`` replicas keep sessions (and their leases,
see :mod:`cloud_service.leases`) where every replica can read them:

- :class:`DirectoryStore`: a folder, e.g. a Kubernetes ReadWriteMany volume or
  a compose volume. A write goes to a temporary file that is fsynced and then
  renamed over the key (splitkd.atomic), so a reader never sees half a file.
- :class:`S3Store`: an S3-compatible object store (AWS S3, MinIO, Ceph, moto).
  A PUT is atomic by itself (an object is whole or absent) and carries its MD5,
  so a truncated upload is refused by the server rather than published.

Both offer a conditional create (``O_EXCL``-like link / ``If-None-Match: *``):
the building block of leases. :class:`RetryingStore` wraps either with retries
and backoff and tracks whether the store answers, which the replica reports
as its readiness.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from splitkd.atomic import fsync_directory, write_bytes_atomic
from splitkd.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
# Segments of letters, digits, '.', '_', '-', never starting with a dot: temporary
# files are dot-files, so no key ever names (or lists) one.
_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")


class StoreError(Exception):
    """A transient failure of a backend (network, timeout, I/O): worth a retry."""


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or len(key) > 512:
        raise InvalidArgument(f"not a storage key: {key[:80]!r}")
    return key


class Store(Protocol):
    description: str

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""

    def write(self, key: str, data: bytes) -> None:
        """Publish ``data`` under ``key`` atomically (whole or not at all)."""

    def create(self, key: str, data: bytes) -> bool:
        """Publish only if ``key`` does not exist yet; False when it did."""

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a folder-like prefix ending in '/' or empty)."""

    def delete(self, key: str) -> None: ...

    def ping(self) -> None:
        """Raise StoreError unless the store answers."""


class DirectoryStore:
    """Keys are paths under ``root`` (a local disk or a shared volume)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.description = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"read {key}: {exc}") from exc

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, data)
        except OSError as exc:
            raise StoreError(f"write {key}: {exc}") from exc

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                # link() fails if the target exists: whole content, and one winner.
                os.link(tmp_name, path)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
            fsync_directory(path.parent)
            return True
        except OSError as exc:
            raise StoreError(f"create {key}: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        folder = self.root / prefix if prefix else self.root
        if not folder.is_dir():
            return []
        try:
            return sorted(
                p.relative_to(self.root).as_posix()
                for p in folder.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.parts[-1:])
            )
        except OSError as exc:
            raise StoreError(f"list {prefix}: {exc}") from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"delete {key}: {exc}") from exc
        # Empty folders we made go too; one holding anything else stays.
        folder = path.parent
        while folder != self.root:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"{self.root} is not a writable folder")


class S3Store:
    """Keys are objects under ``prefix`` in ``bucket`` (credentials: the AWS_* variables)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
        timeout: float = 5.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.description = f"s3://{bucket}/{self.prefix}"
        # One attempt per call: RetryingStore owns the retries, so that their
        # count, backoff and the readiness they feed are ours.
        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 1, "mode": "standard"},
        )
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
                raise StoreError(f"{what}: {code or status}") from exc
            raise
        except BotoCoreError as exc:
            raise StoreError(f"{what}: {exc}") from exc

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        name = self.prefix + check_key(key)
        try:
            reply = self._call(
                f"read {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=name)
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StoreError(f"read {key}: {exc}") from exc
        return bytes(reply["Body"].read())

    def _put(self, key: str, data: bytes, **extra: str) -> None:
        name = self.prefix + check_key(key)
        # Content-MD5: the server refuses a body that arrived other than sent.
        digest = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self._call(
            f"write {key}",
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=name, Body=data, ContentMD5=digest, **extra
            ),
        )

    def write(self, key: str, data: bytes) -> None:
        self._put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._put(key, data, IfNoneMatch="*")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise StoreError(f"create {key}: {exc}") from exc
        return True

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []

        def pages() -> None:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))

        self._call(f"list {prefix}", pages)
        return sorted(k for k in keys if _KEY.fullmatch(k))

    def delete(self, key: str) -> None:
        name = self.prefix + check_key(key)
        self._call(f"delete {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=name))

    def ping(self) -> None:
        self._call("ping", lambda: self.client.head_bucket(Bucket=self.bucket))


class RetryingStore:
    """Retries a backend's transient failures with backoff; knows whether it is up.

    After ``attempts`` failures in a row a call raises :class:`Unavailable` (the
    edge retries it), and :attr:`ready` is False until a call succeeds again:
    the replica then reports not-ready, so Envoy and Kubernetes send its edges
    elsewhere instead of into a store it cannot reach.
    """

    def __init__(
        self,
        inner: Store,
        *,
        attempts: int = 4,
        base_delay: float = 0.05,
        max_delay: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.description = inner.description
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self.ready = True
        self.failures = 0
        self._lock = threading.Lock()

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                result = call()
            except StoreError as exc:
                with self._lock:
                    self.failures += 1
                if attempt + 1 == self.attempts:
                    if self.ready:
                        log.error("shared store %s is down: %s", self.description, exc)
                    self.ready = False
                    raise Unavailable(
                        f"the shared store does not answer ({what}); try again shortly"
                    ) from None
                # Full jitter: replicas that lost the store together do not return in lockstep.
                self._sleep(random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt)))
                continue
            if not self.ready:
                log.warning("shared store %s answers again", self.description)
            self.ready = True
            return result
        raise AssertionError("unreachable")

    def read(self, key: str) -> bytes | None:
        return self._retry(f"read {key}", lambda: self.inner.read(key))

    def write(self, key: str, data: bytes) -> None:
        self._retry(f"write {key}", lambda: self.inner.write(key, data))

    def create(self, key: str, data: bytes) -> bool:
        return self._retry(f"create {key}", lambda: self.inner.create(key, data))

    def list(self, prefix: str) -> list[str]:
        return self._retry(f"list {prefix}", lambda: self.inner.list(prefix))

    def delete(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.inner.delete(key))

    def ping(self) -> None:
        self._retry("ping", self.inner.ping)

    def probe(self) -> bool:
        """Ask the store once (no retries): the readiness probe's answer."""
        try:
            self.inner.ping()
        except StoreError as exc:
            if self.ready:
                log.error("shared store %s is down: %s", self.description, exc)
            self.ready = False
        else:
            self.ready = True
        return self.ready


def open_store(location: str, *, endpoint_url: str = "") -> RetryingStore:
    """``s3://BUCKET/PREFIX`` (``endpoint_url`` for MinIO and others) or a folder."""
    if location.startswith("s3://"):
        parsed = urlparse(location)
        if not parsed.netloc:
            raise InvalidArgument(f"{location!r}: an S3 location is s3://BUCKET/PREFIX")
        return RetryingStore(S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url or None))
    if "://" in location:
        raise InvalidArgument(f"{location!r}: give a folder or s3://BUCKET/PREFIX")
    return RetryingStore(DirectoryStore(Path(location)))
