"""The cloud's security settings in one object: TLS files and device authentication.

``splitkd-cloud serve`` builds it from :class:`CloudSecurityOptions` (flags,
``SPLITKD_*`` variables or the config file);
``build_grpc_server`` and the HTTP API take it from there, so TLS and the
authentication interceptor are configured in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cloud_service.auth import AuthInterceptor, CloudLookup, DeviceAuthenticator, refusal_counter
from cloud_service.devices import DeviceRegistry
from splitkd.settings import Options, option
from splitkd.tls import ServerTLS, server_tls

log = logging.getLogger(__name__)


SECURITY_GROUP = "security (docs/SECURITY.md)"


class CloudSecurityOptions(Options):
    tls_cert: Path | None = option(
        None,
        "server certificate (PEM): gRPC over TLS and the HTTP API over HTTPS",
        group=SECURITY_GROUP,
    )
    tls_key: Path | None = option(None, "its private key", group=SECURITY_GROUP)
    tls_ca: Path | None = option(
        None, "CA that signs device certificates, for mutual TLS", group=SECURITY_GROUP
    )
    require_client_cert: bool = option(
        False,
        "mutual TLS: refuse gRPC clients without a certificate signed by --tls-ca",
        group=SECURITY_GROUP,
    )
    require_auth: bool = option(
        False,
        "refuse devices without an enrolled credential even before the first "
        "'splitkd-cloud devices add'; authentication is on anyway once any device is enrolled",
        group=SECURITY_GROUP,
    )


@dataclass
class CloudSecurity:
    tls: ServerTLS | None = None
    devices: DeviceRegistry | None = None
    require_auth: bool = False

    def __post_init__(self) -> None:
        self.authenticator = (
            DeviceAuthenticator(self.devices, require=self.require_auth)
            if self.devices is not None
            else None
        )

    @classmethod
    def from_options(cls, options: CloudSecurityOptions, state_dir: Path) -> CloudSecurity:
        tls = server_tls(
            options.tls_cert, options.tls_key, options.tls_ca, options.require_client_cert
        )
        devices = DeviceRegistry.in_state_dir(state_dir)
        devices.devices()  # a corrupt registry fails now, not at the first call
        return cls(tls, devices, options.require_auth)

    def auth_enabled(self) -> bool:
        return self.authenticator is not None and self.authenticator.enabled()

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        return self.tls.grpc_credentials() if self.tls is not None else None

    def interceptors(self, service: Any) -> list[grpc.ServerInterceptor]:
        if self.authenticator is None:
            return []
        return [
            AuthInterceptor(
                self.authenticator,
                CloudLookup(service),
                refusal_counter(service.metrics.registry),
                bind_certificate=self.tls is not None and self.tls.require_client_cert,
            )
        ]

    def uvicorn_options(self) -> dict[str, Any]:
        return self.tls.uvicorn_options() if self.tls is not None else {}

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def status(self) -> dict[str, str]:
        """For ``/healthz``: ``auth`` on/off, ``tls`` off/on/mutual."""
        return {
            "auth": "on" if self.auth_enabled() else "off",
            "tls": self.tls.mode if self.tls is not None else "off",
        }

    def announce(self) -> None:
        """One loud line for each protection that is off, at start-up."""
        if self.tls is None:
            log.warning(
                "INSECURE: gRPC and HTTP are plaintext (no --tls-cert): anyone on the network can "
                "read activations, gradients and credentials; see docs/SECURITY.md"
            )
        if not self.auth_enabled():
            where = self.devices.path if self.devices is not None else "devices.json"
            log.warning(
                "INSECURE: device authentication is OFF (no device enrolled in %s, no "
                "--require-auth): any client can train and download any model; enroll devices "
                "with 'splitkd-cloud devices add NAME'",
                where,
            )
        else:
            count = len(self.devices.devices()) if self.devices is not None else 0
            log.info("device authentication is on (%d devices in the registry)", count)
