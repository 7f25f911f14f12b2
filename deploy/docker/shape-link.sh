#!/usr/bin/env bash
# Shape this host's (or container's) network interface like a link profile from
# splitkd/profiles/links.json: uplink bandwidth on the interface's egress,
# downlink bandwidth on its ingress (redirected through an ifb device, since tc
# can only queue egress traffic), and the one-way latency and jitter with netem
# when the kernel has it.
#
# Usage: splitkd-shape-link [--dry-run] [--clear] [--profiles FILE] PROFILE [INTERFACE]
#   PROFILE     ethernet, wifi, lte, nb-iot (or any key of links.json)
#   INTERFACE   default eth0
#   --dry-run   print the tc/ip commands, change nothing (needs no privileges)
#   --clear     remove the shaping from INTERFACE
#   --profiles  links.json to read (default: the installed splitkd package's,
#               else the one in this source tree)
#
# Needs CAP_NET_ADMIN: root, or in the splitkd edge image the entry point's
# netadmin helper (the container must be started with cap_add NET_ADMIN).
# The shaping covers all traffic on the interface, as a real device's link does.
set -euo pipefail

DRY_RUN=0
CLEAR=0
PROFILES=""
IFB="ifb0"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --clear) CLEAR=1; shift ;;
    --profiles) PROFILES="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "shape-link: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ "$CLEAR" -eq 1 ]; then
  DEV="${ARGS[0]:-eth0}"
else
  [ "${#ARGS[@]}" -ge 1 ] || { usage >&2; exit 2; }
  PROFILE="${ARGS[0]}"
  DEV="${ARGS[1]:-eth0}"
fi

run() {
  echo "+ $*"
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

# Best effort: a qdisc that is not there is not an error when clearing.
quiet() {
  echo "+ $* (if present)"
  if [ "$DRY_RUN" -eq 0 ]; then "$@" 2>/dev/null || true; fi
}

clear_shaping() {
  quiet tc qdisc del dev "$DEV" root
  quiet tc qdisc del dev "$DEV" handle ffff: ingress
  quiet ip link del "$IFB"
}

if [ "$CLEAR" -eq 1 ]; then
  clear_shaping
  exit 0
fi

if [ -z "$PROFILES" ]; then
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  PROFILES="$(python3 -c 'import importlib.resources as r; print(r.files("splitkd") / "profiles" / "links.json")' 2>/dev/null || true)"
  [ -n "$PROFILES" ] && [ -f "$PROFILES" ] || PROFILES="$here/../../splitkd/profiles/links.json"
fi
[ -f "$PROFILES" ] || { echo "shape-link: no links.json at $PROFILES" >&2; exit 1; }

# Rates in kbit/s, times in ms; tbf's burst must hold at least one timer tick of
# traffic at the rate (4 ms at HZ=250) and never less than two full frames.
read -r UP_KBIT DOWN_KBIT DELAY_MS JITTER_MS UP_BURST DOWN_BURST < <(
  python3 - "$PROFILES" "$PROFILE" <<'PY'
import json
import sys

links = json.load(open(sys.argv[1]))["links"]
name = sys.argv[2]
if name not in links:
    sys.exit(f"shape-link: unknown link profile {name!r}; known: {', '.join(sorted(links))}")
link = links[name]
up = link["bandwidth_mbps"]["up"] * 1000
down = link["bandwidth_mbps"]["down"] * 1000


def burst(kbit: float) -> int:
    return max(int(kbit * 1000 / 8 * 0.004), 3028)


print(f"{up:.0f} {down:.0f} {link['latency_ms']:g} {link['jitter_ms']:g} {burst(up)} {burst(down)}")
PY
)

echo "shape-link: $DEV as '$PROFILE': up ${UP_KBIT} kbit/s, down ${DOWN_KBIT} kbit/s, one-way delay ${DELAY_MS} ms ± ${JITTER_MS} ms"

have_netem() {
  # Probe on a throwaway qdisc: `tc qdisc add ... netem` fails with "unknown
  # qdisc kind" on kernels built without CONFIG_NET_SCH_NETEM (like ours).
  if [ "$DRY_RUN" -eq 1 ]; then
    echo "shape-link: dry run: shown with netem; a kernel without it gets the tbf lines only, at the root"
    return 0
  fi
  if tc qdisc add dev "$DEV" root handle 1: netem delay 0ms 2>/dev/null; then
    tc qdisc del dev "$DEV" root 2>/dev/null || true
    return 0
  fi
  return 1
}

# One direction on one device: netem (delay, jitter) at the root with the
# token bucket below it, or the token bucket alone without netem. The queue
# holds 200 ms at the link rate: real radio links buffer deeply.
shape() {
  local dev="$1" kbit="$2" burst="$3"
  if [ "$NETEM" -eq 1 ]; then
    run tc qdisc add dev "$dev" root handle 1: netem delay "${DELAY_MS}ms" "${JITTER_MS}ms" distribution normal
    run tc qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "${kbit}kbit" burst "$burst" latency 200ms
  else
    run tc qdisc add dev "$dev" root handle 1: tbf rate "${kbit}kbit" burst "$burst" latency 200ms
  fi
}

clear_shaping
NETEM=0
if have_netem; then
  NETEM=1
else
  echo "shape-link: this kernel has no netem: bandwidth is shaped, latency and jitter are not added" >&2
fi

# Uplink: what the device sends leaves through the interface's egress queue.
shape "$DEV" "$UP_KBIT" "$UP_BURST"
# Downlink: redirect everything arriving on the interface through ifb0 and
# shape ifb0's egress.
run ip link add "$IFB" type ifb
run ip link set "$IFB" up
run tc qdisc add dev "$DEV" handle ffff: ingress
run tc filter add dev "$DEV" parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev "$IFB"
shape "$IFB" "$DOWN_KBIT" "$DOWN_BURST"
if [ "$DRY_RUN" -eq 0 ]; then
  tc qdisc show dev "$DEV"
  tc qdisc show dev "$IFB"
fi
