"""``splitkd-cloud certs`` and ``splitkd-cloud devices add|list|revoke``."""

# A command-line program like cli.py: what it prints is its output for the user.
# ruff: noqa: T201

from __future__ import annotations

import json
import os

from cloud_service.settings import (
    CertsSettings,
    DevicesAddSettings,
    DevicesListSettings,
    DevicesRevokeSettings,
)
from splitkd.settings import Command


def _certs(args: CertsSettings) -> int:
    from cloud_service.certs import make_certs

    result = make_certs(args.out, devices=tuple(args.cert_devices), hosts=tuple(args.cert_hosts))
    for path in result.written:
        print(f"wrote {path}")
    for path in result.kept:
        print(f"kept  {path}")
    print(
        f"cloud: --tls-cert {args.out}/server.pem --tls-key {args.out}/server-key.pem "
        f"[--tls-ca {args.out}/ca.pem --require-client-cert]; edge: --tls-ca {args.out}/ca.pem"
    )
    return 0


def _devices_add(args: DevicesAddSettings) -> int:
    from cloud_service.devices import DeviceRegistry

    credential = DeviceRegistry.in_state_dir(args.state_dir).add(args.name, replace=args.replace)
    if args.write_credential is not None:
        fd = os.open(args.write_credential, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(credential + "\n")
        print(f"enrolled {args.name}; credential written to {args.write_credential}")
    else:
        print(f"enrolled {args.name}; its credential (shown only now, store it on the device):")
        print(credential)
    print(f"edge: splitkd-edge train --device-id {args.name} --credential-file FILE ...")
    return 0


def _devices_revoke(args: DevicesRevokeSettings) -> int:
    from cloud_service.devices import DeviceRegistry

    device = DeviceRegistry.in_state_dir(args.state_dir).revoke(args.name)
    print(f"revoked {device.name} at {device.revoked_at}")
    return 0


def _devices_list(args: DevicesListSettings) -> int:
    from cloud_service.devices import DeviceRegistry

    registry = DeviceRegistry.in_state_dir(args.state_dir)
    devices = [d.public() for d in registry.devices()]
    if args.as_json:
        print(json.dumps({"devices": devices}, indent=2))
    elif not devices:
        print(f"no devices enrolled in {registry.path}")
    else:
        print(f"{'NAME':<24} {'STATE':<9} {'ENROLLED':<21} REVOKED")
        for d in devices:
            print(
                f"{d['name']:<24} {d['state']:<9} {d['enrolled_at']:<21} {d['revoked_at'] or '-'}"
            )
    return 0


GROUP_HELP = {"devices": "enroll, list and revoke edge devices"}
COMMANDS = (
    Command(
        "certs",
        CertsSettings,
        _certs,
        help="make a development CA, a server certificate and device certificates (PEM)",
        description="Write ca.pem, server.pem/server-key.pem and device-NAME.pem/"
        "device-NAME-key.pem into --out. An existing CA in --out is reused, so devices added "
        "later are trusted too.",
    ),
    Command(
        "devices add",
        DevicesAddSettings,
        _devices_add,
        help="enroll a device and print its credential (once)",
    ),
    Command(
        "devices list",
        DevicesListSettings,
        _devices_list,
        help="list devices and their state (no secrets)",
    ),
    Command(
        "devices revoke",
        DevicesRevokeSettings,
        _devices_revoke,
        help="refuse a device from its next call on",
    ),
)
