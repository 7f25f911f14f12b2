"""Generate docs/PROTOCOL.md from protos/splitkd/v1/splitkd.proto (``make proto``).

``--check`` fails when the committed page differs from what the .proto gives,
so the page a person reads is always the contract the code speaks.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos/splitkd/v1/splitkd.proto"
PAGE = ROOT / "docs/PROTOCOL.md"
_BLOCK = re.compile(r"((?://[^\n]*\n)*)(message|enum|service) (\w+) \{(.*?)\n\}", re.S)
_RPC = re.compile(r"rpc (\w+)\((\w+)\) returns \((stream )?(\w+)\);")


def render(text: str) -> str:
    out = [
        "# The wire protocol: `splitkd.v1`",
        "",
        "Generated from `protos/splitkd/v1/splitkd.proto` by `make proto`; "
        "`make test` fails when this page and the .proto differ. Do not edit by hand.",
        "",
    ]
    header = text.split("syntax")[0]
    out += [line.removeprefix("//").removeprefix(" ") for line in header.strip().splitlines()]
    blocks = _BLOCK.findall(text)
    for _comment, kind, name, body in blocks:
        if kind != "service":
            continue
        out += ["", f"## service `{name}`", "", "| RPC | request | response |", "|---|---|---|"]
        for rpc, request, stream, response in _RPC.findall(body):
            out.append(f"| `{rpc}` | `{request}` | {'stream of ' if stream else ''}`{response}` |")
    out += ["", "## Messages"]
    for comment, kind, name, body in blocks:
        if kind == "service":
            continue
        out += ["", f"### {kind} `{name}`", ""]
        doc = [line.strip().removeprefix("//").strip() for line in comment.strip().splitlines()]
        if doc:
            out += [" ".join(doc), ""]
        out += ["```protobuf", f"{kind} {name} {{", body.strip("\n"), "}", "```"]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if docs/PROTOCOL.md is stale")
    args = parser.parse_args()
    page = render(PROTO.read_text())
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print("docs/PROTOCOL.md is stale; run 'make proto' and commit")
            return 1
        print("docs/PROTOCOL.md matches the .proto")
        return 0
    PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
