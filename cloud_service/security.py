"""The cloud's security settings in one object: TLS files and device authentication.

``splitkd-cloud serve`` builds it from flags (or ``SPLITKD_*`` variables);
``build_grpc_server`` and the HTTP API take it from there, so TLS and the
authentication interceptor are configured in one place.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cloud_service.auth import AuthInterceptor, CloudLookup, DeviceAuthenticator, refusal_counter
from cloud_service.devices import DeviceRegistry
from splitkd.env import env_flag, env_path
from splitkd.tls import ServerTLS, server_tls

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (docs/SECURITY.md)")
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=env_path("TLS_CERT"),
        help="server certificate (PEM): gRPC over TLS and the HTTP API over HTTPS (SPLITKD_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key",
        type=Path,
        default=env_path("TLS_KEY"),
        help="its private key (SPLITKD_TLS_KEY)",
    )
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=env_path("TLS_CA"),
        help="CA that signs device certificates, for mutual TLS (SPLITKD_TLS_CA)",
    )
    group.add_argument(
        "--require-client-cert",
        action="store_true",
        default=env_flag("REQUIRE_CLIENT_CERT"),
        help="mutual TLS: refuse gRPC clients without a certificate signed by --tls-ca "
        "(SPLITKD_REQUIRE_CLIENT_CERT=1)",
    )
    group.add_argument(
        "--require-auth",
        action="store_true",
        default=env_flag("REQUIRE_AUTH"),
        help="refuse devices without an enrolled credential even before the first "
        "'splitkd-cloud devices add' (SPLITKD_REQUIRE_AUTH=1); authentication is on anyway once "
        "any device is enrolled",
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
    def from_args(cls, args: argparse.Namespace) -> CloudSecurity:
        tls = server_tls(args.tls_cert, args.tls_key, args.tls_ca, args.require_client_cert)
        devices = DeviceRegistry.in_state_dir(args.state_dir)
        devices.devices()  # a corrupt registry fails now, not at the first call
        return cls(tls, devices, args.require_auth)

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
