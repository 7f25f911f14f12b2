"""``splitkd-cloud certs`` and ``splitkd-cloud devices add|list|revoke``."""

# A command-line program like cli.py: what it prints is its output for the user.
# ruff: noqa: T201

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

COMMANDS = ("certs", "devices")


def _state_dir_default() -> Path:
    return Path(os.environ.get("SPLITKD_STATE_DIR") or ".splitkd-cloud")


def add_commands(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser(
        "certs",
        help="make a development CA, a server certificate and device certificates (PEM)",
        description="Write ca.pem, server.pem/server-key.pem and device-NAME.pem/device-NAME-key.pem "
        "into --out. An existing CA in --out is reused, so devices added later are trusted too.",
    )
    certs.add_argument("--out", type=Path, required=True, help="folder for the PEM files")
    certs.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="NAME",
        help="issue a client certificate for this device (repeatable)",
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP address in the server certificate (repeatable; localhost, "
        "127.0.0.1 and ::1 are always in it)",
    )

    devices = sub.add_parser("devices", help="enroll, list and revoke edge devices")
    devices_sub = devices.add_subparsers(dest="devices_command", required=True)
    state_dir = argparse.ArgumentParser(add_help=False)
    state_dir.add_argument(
        "--state-dir",
        type=Path,
        default=_state_dir_default(),
        help="the cloud's state folder, holding devices.json (SPLITKD_STATE_DIR)",
    )
    add = devices_sub.add_parser(
        "add", parents=[state_dir], help="enroll a device and print its credential (once)"
    )
    add.add_argument("name", help="the device's id (its --device-id)")
    add.add_argument(
        "--replace",
        action="store_true",
        help="issue a new credential for an enrolled or revoked device (the old one stops working)",
    )
    add.add_argument(
        "--credential-file",
        type=Path,
        help="write the credential to this file (mode 0600) instead of printing it",
    )
    listing = devices_sub.add_parser(
        "list", parents=[state_dir], help="list devices and their state (no secrets)"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    revoke = devices_sub.add_parser(
        "revoke", parents=[state_dir], help="refuse a device from its next call on"
    )
    revoke.add_argument("name")


def run(args: argparse.Namespace) -> int:
    if args.command == "certs":
        return _certs(args)
    return _devices(args)


def _certs(args: argparse.Namespace) -> int:
    from cloud_service.certs import make_certs

    result = make_certs(args.out, devices=tuple(args.device), hosts=tuple(args.host))
    for path in result.written:
        print(f"wrote {path}")
    for path in result.kept:
        print(f"kept  {path}")
    print(
        f"cloud: --tls-cert {args.out}/server.pem --tls-key {args.out}/server-key.pem "
        f"[--tls-ca {args.out}/ca.pem --require-client-cert]; edge: --tls-ca {args.out}/ca.pem"
    )
    return 0


def _devices(args: argparse.Namespace) -> int:
    from cloud_service.devices import DeviceRegistry

    registry = DeviceRegistry.in_state_dir(args.state_dir)
    if args.devices_command == "add":
        credential = registry.add(args.name, replace=args.replace)
        if args.credential_file is not None:
            fd = os.open(args.credential_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(credential + "\n")
            print(f"enrolled {args.name}; credential written to {args.credential_file}")
        else:
            print(f"enrolled {args.name}; its credential (shown only now, store it on the device):")
            print(credential)
        print(f"edge: splitkd-edge train --device-id {args.name} --credential-file FILE ...")
        return 0
    if args.devices_command == "revoke":
        device = registry.revoke(args.name)
        print(f"revoked {device.name} at {device.revoked_at}")
        return 0
    devices = [d.public() for d in registry.devices()]
    if args.json:
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
