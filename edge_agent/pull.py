"""Download a student from the cloud's HTTP API with the standard library only."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeError
from edge_agent.model_store import LocalModel, ModelStore


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
    if version == 0:
        listing: dict[str, Any] = json.loads(_fetch(f"{base}/v1/models", timeout, headers, context))
        found = [m for m in listing.get("models", []) if m.get("name") == name]
        if not found:
            raise EdgeError(f"the cloud at {base} has no model named {name!r}")
        version = int(found[0]["latest"])
    metadata = json.loads(
        _fetch(f"{base}/v1/models/{name}/versions/{version}", timeout, headers, context)
    )
    data = _fetch(
        f"{base}/v1/models/{name}/versions/{version}/model.onnx", timeout, headers, context
    )
    store.root.mkdir(parents=True, exist_ok=True)
    download = Path(store.root) / f".{name}-{version}.download"
    download.write_bytes(data)
    return store.install(name, version, download, metadata)
