"""Download a student from the cloud's HTTP API with the standard library only."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from edge_agent.errors import EdgeError
from edge_agent.model_store import LocalModel, ModelStore, check_model_id


def _fetch(
    url: str,
    timeout: float,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise EdgeError(f"GET {url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise EdgeError(f"cannot reach {url}: {exc}") from None


def pull(
    base_url: str,
    name: str,
    version: int,
    store: ModelStore,
    timeout: float = 60.0,
    *,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> LocalModel:
    """``headers``: the device's credentials; ``context``: TLS trust for an https:// cloud."""
    base = base_url.rstrip("/")
    check_model_id(name, version or 1)  # before it goes into a URL or a path
    latest: object = version
    if version == 0:
        listing = _json(_fetch(f"{base}/v1/models", timeout, headers, context), base)
        models = listing.get("models") if isinstance(listing, dict) else None
        found = [m for m in models or [] if isinstance(m, dict) and m.get("name") == name]
        if not found:
            raise EdgeError(f"the cloud at {base} has no model named {name!r}")
        latest = found[0].get("latest")
    name, version = check_model_id(name, latest)
    metadata = _json(
        _fetch(f"{base}/v1/models/{name}/versions/{version}", timeout, headers, context), base
    )
    data = _fetch(
        f"{base}/v1/models/{name}/versions/{version}/model.onnx", timeout, headers, context
    )
    store.root.mkdir(parents=True, exist_ok=True)
    download = store.download_path(name, version)
    download.write_bytes(data)  # our own dot-file; install() moves it in durably
    return store.install(name, version, download, metadata)


def _json(body: bytes, base: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise EdgeError(f"the cloud at {base} answered something that is not JSON") from None
