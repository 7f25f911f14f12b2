"""The edge's side of security: TLS to the cloud, its device credential, HTTPS for ``serve``.

The one place that opens the channel to the cloud (:func:`open_channel`):
TLS when credentials are given, and the device's name and credential added
to every call as metadata (``x-splitkd-device``, ``authorization: Bearer``).
grpc is imported only where a channel is built, so the inference-only
install (no grpc) can still parse these options and serve HTTPS.
"""

from __future__ import annotations

import argparse
import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitkd.env import env, env_path
from splitkd.errors import SplitKDError
from splitkd.tls import ClientTLS, ServerTLS, server_tls

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)
DEVICE_HEADER = "x-splitkd-device"
AUTHORIZATION_HEADER = "authorization"


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for talking to the cloud: TLS trust, client certificate, device credential."""
    group = parser.add_argument_group("security (docs/SECURITY.md)")
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=env_path("TLS_CA"),
        help="connect with TLS, trusting this CA's PEM certificate (SPLITKD_TLS_CA)",
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=env_path("TLS_CERT"),
        help="this device's certificate, for a cloud that requires mutual TLS (SPLITKD_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key", type=Path, default=env_path("TLS_KEY"), help="its key (SPLITKD_TLS_KEY)"
    )
    group.add_argument(
        "--credential",
        default=env("CREDENTIAL"),
        help="this device's credential from 'splitkd-cloud devices add' (SPLITKD_CREDENTIAL; "
        "prefer --credential-file: a flag is visible to other users in 'ps')",
    )
    group.add_argument(
        "--credential-file",
        type=Path,
        default=env_path("CREDENTIAL_FILE"),
        help="file holding the credential (SPLITKD_CREDENTIAL_FILE)",
    )


def add_https_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTPS")
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=env_path("TLS_CERT"),
        help="serve HTTPS with this certificate (PEM) (SPLITKD_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key", type=Path, default=env_path("TLS_KEY"), help="its key (SPLITKD_TLS_KEY)"
    )


def https_options(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn's ``ssl_certfile``/``ssl_keyfile`` for ``serve``, or nothing (plain HTTP)."""
    tls: ServerTLS | None = server_tls(args.tls_cert, args.tls_key)
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


def add_http_token_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("access to /v1/predict")
    group.add_argument(
        "--http-token",
        default=env("HTTP_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on /v1/predict (SPLITKD_HTTP_TOKEN; "
        "default: no token, anyone who reaches the port may predict)",
    )
    group.add_argument(
        "--http-token-file",
        type=Path,
        default=env_path("HTTP_TOKEN_FILE"),
        help="file holding that token (SPLITKD_HTTP_TOKEN_FILE)",
    )


def http_token(args: argparse.Namespace) -> str | None:
    return read_credential(args.http_token, args.http_token_file, flag="--http-token")


@dataclass(frozen=True)
class EdgeSecurity:
    """TLS towards the cloud (None: plaintext) and the device's credential (None: none)."""

    tls: ClientTLS | None = None
    credential: str | None = None

    def __repr__(self) -> str:  # never print the credential, even in a traceback
        return f"EdgeSecurity(tls={self.tls!r}, credential={'***' if self.credential else None})"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EdgeSecurity:
        tls = None
        if args.tls_ca or args.tls_cert or args.tls_key:
            tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)
            tls.check()
        security = cls(tls, read_credential(args.credential, args.credential_file))
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
) -> grpc.Channel:
    """A channel to the cloud: TLS when ``credentials`` are given, ``metadata`` on every call."""
    import grpc

    if credentials is not None:
        channel = grpc.secure_channel(address, credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(address, options=list(options))
    if not metadata:
        return channel
    return grpc.intercept_channel(channel, _metadata_interceptor(tuple(metadata)))


def _metadata_interceptor(metadata: tuple[tuple[str, str], ...]) -> Any:
    import grpc

    class CallDetails(
        collections.namedtuple(
            "CallDetails",
            ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
        ),
        grpc.ClientCallDetails,
    ):
        pass

    class AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
        def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
            return CallDetails(
                details.method,
                details.timeout,
                (*(details.metadata or ()), *metadata),
                details.credentials,
                getattr(details, "wait_for_ready", None),
                getattr(details, "compression", None),
            )

        def intercept_unary_unary(
            self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
        ) -> Any:
            return continuation(self._details(details), request)

        def intercept_unary_stream(
            self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
        ) -> Any:
            return continuation(self._details(details), request)

    return AddMetadata()
