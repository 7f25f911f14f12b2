"""What ``/v1/predict`` checks before FastAPI parses a body: its size, then the token.

A pure ASGI layer, so that an oversized or unauthorised request costs neither
memory nor JSON parsing: a 50 MB body is refused from its Content-Length, or
after the first bytes past the limit when it is streamed without one.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def authorized(header: bytes | None, token: str) -> bool:
    """``Authorization: Bearer TOKEN``, compared in constant time (no timing oracle)."""
    scheme, _, given = (header or b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


async def _answer(
    send: Send, status: int, detail: str, extra: dict[str, str] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class PredictGuard:
    """Wraps the app: requests to ``path`` need the token (if any) and at most ``limit()`` bytes."""

    def __init__(
        self, app: ASGIApp, path: str, token: str | None, limit: Callable[[], int]
    ) -> None:
        self.app, self.path, self.token, self.limit = app, path, token, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        limit = self.limit()
        too_large = f"request body larger than {limit} bytes (--max-body-bytes)"
        # The rest of an oversized body stays unread: the connection must close after
        # the answer, or the client would hang writing into a socket nobody reads.
        close = {"connection": "close"}
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            await _answer(send, 413, too_large, close)
            return
        # The token is checked after the (bounded) body is read, so that a refused client
        # gets its 401 on a connection that is still in step, not a reset.
        body = await _read_at_most(receive, limit)
        if body is None:
            await _answer(send, 413, too_large, close)
            return
        if self.token is not None and not authorized(headers.get(b"authorization"), self.token):
            await _answer(
                send, 401, "missing or wrong bearer token", {"www-authenticate": "Bearer"}
            )
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_at_most(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` (or the client left)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # later: a disconnect
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
