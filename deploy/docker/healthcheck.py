#!/usr/bin/env python3
"""Container health check with the standard library only (no curl in the images).

    splitkd-healthcheck URL [--status VALUE]

Exit 0 when URL answers HTTP 200 within 3 s and, with --status, when its JSON
body has "status" equal to VALUE (an edge answers "no-model" until its student
is installed, so ``--status ok`` means "trained, deployed and serving").
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def main() -> int:
    parser = argparse.ArgumentParser(prog="splitkd-healthcheck")
    parser.add_argument("url")
    parser.add_argument("--status", help='required value of "status" in the JSON answer')
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"{args.url}: {exc}\n")
        return 1
    if args.status is None:
        return 0
    try:
        status = json.loads(body).get("status")
    except (ValueError, AttributeError):
        # While an edge trains, its port serves Prometheus text, not JSON.
        sys.stderr.write(f"{args.url}: not a JSON health answer (still training?)\n")
        return 1
    if status != args.status:
        sys.stderr.write(f"{args.url}: status {status!r}, want {args.status!r}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
