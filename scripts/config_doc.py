"""Generate docs/CONFIGURATION.md from the commands' settings classes.

``--check`` fails when the committed page differs from what the code declares, so
every option a command accepts is documented with its flag, variable and key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs/CONFIGURATION.md"
sys.path.insert(0, str(ROOT))

INTRO = """\
# Configuration

Generated from the settings classes (`edge_agent/settings.py`, `cloud_service/settings.py`,
the security options in `*/security.py`) by `make config-doc`; `make test` fails
when this page and the code differ. Do not edit by hand.

Every option is given, highest precedence first, by

1. its **flag** on the command line;
2. its **environment variable**, `SPLITKD_` + the option's name in capitals (an empty value
   counts as unset);
3. a **config file** in TOML, named by `--config FILE` or `SPLITKD_CONFIG`: top-level keys apply
   to every command of the program that has the option, a table named after the command
   (`[train]`, `[serve]`, `[devices.add]`) to that command only; a key no command knows is
   refused;
4. its **default**.

Options marked "command line only" name what one invocation acts on and are read from the
command line alone. A value that does not parse ends the command with one line naming where it
came from (the flag, the variable or the file's key) and exit code 2. `-v`/`--verbose` (and
`-q` for the cloud) go before the command; `SPLITKD_LOG_LEVEL` sets the log level.

```toml
# edge.toml: splitkd-edge train --config edge.toml
cloud = "cloud.example:50051"
device_profile = "raspberry-pi-4"

[train]
data = "npz:/var/lib/splitkd/mine.npz"
presumed_fraction = 0
```
"""


def render() -> str:
    from cloud_service.cli import PROGRAM as CLOUD
    from edge_agent.cli import PROGRAM as EDGE
    from splitkd.settings import reference_table

    out = [INTRO]
    for program in (EDGE, CLOUD):
        for command in program.commands:
            out += [f"## `{program.prog} {command.name}`", "", command.help, ""]
            out += [*reference_table(command.settings), ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the page is stale")
    page = render()
    if parser.parse_args().check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print("docs/CONFIGURATION.md is stale; run 'python scripts/config_doc.py' and commit")
            return 1
        print("docs/CONFIGURATION.md matches the settings classes")
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
