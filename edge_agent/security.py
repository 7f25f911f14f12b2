"""The edge's side of security: TLS to the cloud, its device credential, HTTPS for ``serve``.

The one place that opens the channel to the cloud (:func:`open_channel`):
TLS when credentials are given, and the device's name and credential added
to every call as metadata (``x-splitkd-device``, ``authorization: Bearer``).
grpc is imported only where a channel is built, so the inference-only
install (no grpc) can still parse these options and serve HTTPS. The options
are settings fields (:mod:`splitkd.settings`): flags, SPLITKD_* and the config file.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitkd.errors import SplitKDError
from splitkd.settings import Options, option
from splitkd.tls import ClientTLS, ServerTLS, server_tls

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)
DEVICE_HEADER = "x-splitkd-device"
AUTHORIZATION_HEADER = "authorization"


SECURITY_GROUP = "security (docs/SECURITY.md)"


class ClientSecurityOptions(Options):
    """Options for talking to the cloud: TLS trust, client certificate, device credential."""

    tls_ca: Path | None = option(
        None, "connect with TLS, trusting this CA's PEM certificate", group=SECURITY_GROUP
    )
    tls_cert: Path | None = option(
        None,
        "this device's certificate, for a cloud that requires mutual TLS",
        group=SECURITY_GROUP,
    )
    tls_key: Path | None = option(None, "its key", group=SECURITY_GROUP)
    credential: str | None = option(
        None,
        "this device's credential from 'splitkd-cloud devices add' (prefer --credential-file: "
        "a flag is visible to other users in 'ps')",
        group=SECURITY_GROUP,
    )
    credential_file: Path | None = option(None, "file holding the credential", group=SECURITY_GROUP)


class HttpsOptions(Options):
    tls_cert: Path | None = option(None, "serve HTTPS with this certificate (PEM)", group="HTTPS")
    tls_key: Path | None = option(None, "its key", group="HTTPS")


def https_options(options: HttpsOptions) -> dict[str, Any]:
    """uvicorn's ``ssl_certfile``/``ssl_keyfile`` for ``serve``, or nothing (plain HTTP)."""
    tls: ServerTLS | None = server_tls(options.tls_cert, options.tls_key)
    return tls.uvicorn_options() if tls is not None else {}


def read_credential(
    credential: str | None, credential_file: Path | None, flag: str = "--credential"
) -> str | None:
    """A secret given inline or in a file (``flag`` and ``flag``-file name it in errors)."""
    if credential and credential_file:
        raise SplitKDError(f"give {flag} or {flag}-file, not both")
    if credential_file is not None:
        try:
            credential = credential_file.read_text().strip()
        except OSError as exc:
            raise SplitKDError(
                f"cannot read {flag}-file {credential_file}: {exc.strerror}"
            ) from None
        if not credential:
            raise SplitKDError(f"{flag}-file {credential_file} is empty")
    if credential is not None and (not credential.isprintable() or " " in credential.strip()):
        raise SplitKDError(f"the {flag.lstrip('-')} must be one word of printable characters")
    return credential.strip() if credential else None


TOKEN_GROUP = "access to /v1/predict"


class HttpTokenOptions(Options):
    """The optional bearer token that guards ``/v1/predict`` (``edge_agent/http_guard.py``)."""

    http_token: str | None = option(
        None,
        "require 'Authorization: Bearer TOKEN' on /v1/predict (default: no token, anyone who "
        "reaches the port may predict; prefer --http-token-file)",
        group=TOKEN_GROUP,
    )
    http_token_file: Path | None = option(None, "file holding that token", group=TOKEN_GROUP)
    max_body_bytes: int = option(
        0,
        "largest /v1/predict body; larger ones get 413 (0: a full batch of the model's inputs "
        "as JSON, 32 bytes a value)",
        group=TOKEN_GROUP,
    )


def http_token(options: HttpTokenOptions) -> str | None:
    return read_credential(options.http_token, options.http_token_file, flag="--http-token")


@dataclass(frozen=True)
class EdgeSecurity:
    """TLS towards the cloud (None: plaintext) and the device's credential (None: none)."""

    tls: ClientTLS | None = None
    credential: str | None = None

    def __repr__(self) -> str:  # never print the credential, even in a traceback
        return f"EdgeSecurity(tls={self.tls!r}, credential={'***' if self.credential else None})"

    @classmethod
    def from_options(cls, options: ClientSecurityOptions) -> EdgeSecurity:
        tls = None
        if options.tls_ca or options.tls_cert or options.tls_key:
            tls = ClientTLS(options.tls_ca, options.tls_cert, options.tls_key)
            tls.check()
        security = cls(tls, read_credential(options.credential, options.credential_file))
        if security.credential and tls is None:
            log.warning(
                "the device credential travels in clear text: connect with --tls-ca "
                "(docs/SECURITY.md)"
            )
        return security

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        return self.tls.grpc_credentials() if self.tls is not None else None

    def call_metadata(self, device_id: str) -> tuple[tuple[str, str], ...]:
        if not self.credential:
            return ()
        return ((DEVICE_HEADER, device_id), (AUTHORIZATION_HEADER, f"Bearer {self.credential}"))


def open_channel(
    address: str,
    options: Sequence[tuple[str, Any]],
    credentials: grpc.ChannelCredentials | None = None,
    metadata: Sequence[tuple[str, str]] = (),
    interceptors: Sequence[Any] = (),
) -> grpc.Channel:
    """A channel to the cloud: TLS when ``credentials`` are given, ``metadata`` on every
    call, then ``interceptors`` (e.g. edge_agent/sticky.py's)."""
    import grpc

    if credentials is not None:
        channel = grpc.secure_channel(address, credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(address, options=list(options))
    chain = (*((_metadata_interceptor(tuple(metadata)),) if metadata else ()), *interceptors)
    return grpc.intercept_channel(channel, *chain) if chain else channel


@functools.cache
def _call_details_class() -> type:
    import grpc

    class CallDetails(
        collections.namedtuple(
            "CallDetails",
            ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
        ),
        grpc.ClientCallDetails,
    ):
        pass

    return CallDetails


def with_metadata(
    details: grpc.ClientCallDetails, metadata: Sequence[tuple[str, str]]
) -> grpc.ClientCallDetails:
    """``details`` of a call with ``metadata`` added (how an interceptor sends headers)."""
    result: grpc.ClientCallDetails = _call_details_class()(
        details.method,
        details.timeout,
        (*(details.metadata or ()), *metadata),
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )
    return result


def _metadata_interceptor(metadata: tuple[tuple[str, str], ...]) -> Any:
    import grpc

    class AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
        def intercept_unary_unary(
            self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
        ) -> Any:
            return continuation(with_metadata(details, metadata), request)

        def intercept_unary_stream(
            self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
        ) -> Any:
            return continuation(with_metadata(details, metadata), request)

    return AddMetadata()
