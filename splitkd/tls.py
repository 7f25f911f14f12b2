"""PEM files into gRPC and uvicorn TLS settings, with errors a person can act on.

Both sides use these: the cloud for its gRPC server and HTTP API, the edge
for its channel to the cloud and its own HTTP API. grpc is imported inside
the functions that need it, so the inference-only edge install (no grpc)
can still serve HTTPS.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitkd.errors import SplitKDError

if TYPE_CHECKING:
    import grpc

_PEM_MARKER = b"-----BEGIN "


class TLSConfigError(SplitKDError):
    """A TLS file is missing, unreadable, not PEM, or the options do not fit together."""


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file, or a one-line error naming the option and the fix."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(
            f"{what} {path} does not exist (make development files with 'splitkd-cloud certs --out DIR')"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if _PEM_MARKER not in data:
        raise TLSConfigError(f"{what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """The files a TLS server needs; ``ca`` and ``require_client_cert`` add mutual TLS."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False

    def check(self) -> None:
        """Read every file now, so a typo fails at start-up and not at the first call."""
        read_pem(self.cert, "--tls-cert")
        read_pem(self.key, "--tls-key")
        if self.ca is not None:
            read_pem(self.ca, "--tls-ca")
        if self.require_client_cert and self.ca is None:
            raise TLSConfigError(
                "--require-client-cert needs --tls-ca: the CA that signed the devices' certificates"
            )

    @property
    def mode(self) -> str:
        return "mutual" if self.require_client_cert else "on"

    def grpc_credentials(self) -> grpc.ServerCredentials:
        import grpc

        root = read_pem(self.ca, "--tls-ca") if self.ca is not None else None
        return grpc.ssl_server_credentials(
            [(read_pem(self.key, "--tls-key"), read_pem(self.cert, "--tls-cert"))],
            root_certificates=root,
            require_client_auth=self.require_client_cert,
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """HTTPS for a uvicorn server with the same certificate.

        The HTTP APIs do not ask for client certificates: Prometheus and health
        checks scrape them, and model files are checked by SHA-256 on the device.
        """
        self.check()
        return {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}


def server_tls(
    cert: Path | None,
    key: Path | None,
    ca: Path | None = None,
    require_client_cert: bool = False,
) -> ServerTLS | None:
    """Server TLS from command-line options; None (plaintext) when no certificate is given."""
    if cert is None and key is None:
        if ca is not None or require_client_cert:
            raise TLSConfigError(
                "--tls-ca and --require-client-cert need --tls-cert and --tls-key (the server's own)"
            )
        return None
    if cert is None or key is None:
        raise TLSConfigError("give both --tls-cert and --tls-key, or neither")
    tls = ServerTLS(cert, key, ca, require_client_cert)
    tls.check()
    return tls


@dataclass(frozen=True)
class ClientTLS:
    """Trust ``ca`` (None: the system's roots); ``cert``/``key`` identify the client (mTLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def check(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TLSConfigError("give both --tls-cert and --tls-key (the device's), or neither")
        for path, what in (
            (self.ca, "--tls-ca"),
            (self.cert, "--tls-cert"),
            (self.key, "--tls-key"),
        ):
            if path is not None:
                read_pem(path, what)

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        import grpc

        self.check()
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "--tls-ca") if self.ca else None,
            private_key=read_pem(self.key, "--tls-key") if self.key else None,
            certificate_chain=read_pem(self.cert, "--tls-cert") if self.cert else None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS with the standard library (``urllib``)."""
        self.check()
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context
