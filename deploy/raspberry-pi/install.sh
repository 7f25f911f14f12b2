#!/usr/bin/env bash
# Install the splitkd edge agent on a Raspberry Pi (64-bit Raspberry Pi OS,
# bookworm or later; Pi 4 or Pi 5) into a virtual environment, with systemd
# units to serve (and optionally train) and a configuration file.
#
# Usage: sudo deploy/raspberry-pi/install.sh [options]
#   --inference-only   serve and pull only: onnxruntime, no training stack
#                      (no torch, no gRPC); the same venv on x86-64 takes
#                      200 MB instead of 1.4 GB
#   --dry-run          print every command, change nothing (no root needed)
#   --prefix DIR       the virtual environment (default /opt/splitkd)
#   --source PATH      splitkd source tree or wheel (default: this checkout)
#   --wheelhouse DIR   install offline from this folder of wheels
#                      (deploy/docker/build-wheelhouse.sh --platform linux/arm64)
#   --user NAME        system user the services run as (default splitkd)
#   --no-systemd       do not install or enable the systemd units
#   -h, --help         this text
# After it: edit /etc/splitkd/edge.env, then see docs/RASPBERRY_PI.md.
set -euo pipefail

# ---- Pinned versions -------------------------------------------------------
# The official aarch64 wheels of torch and onnxruntime have repeatedly crashed
# on the Pi 4's Cortex-A72 with "Illegal instruction": that core is ARMv8.0-A,
# without the ARMv8.1 LSE atomics (ldaddal, casal, ...) that newer builds emit.
#   torch 2.0.0 (download.pytorch.org, pytorch#97226), 2.4.0 (Arm Compute
#   Library, pytorch#132032, fixed in 2.4.1), 2.6.0 (ONNX export path,
#   pytorch#146792) and 2.10.0 (mimalloc in libc10 built with LSE: SIGILL at
#   `import torch`, pytorch#174344 and #176993, fixed in 2.11.0).
#   onnxruntime 1.21.0 (SIGILL at `import onnxruntime` on Pi 4,
#   onnxruntime#23957 and #24112); 1.20 ran on the same boards.
#   PyPI's aarch64 torch 2.13.0 (the CUDA build): its first matrix product
#   dies on a Cortex-A72 (`ldaddal` in the bundled NVIDIA BLAS,
#   libnvpl_blas_core), found by `make pi-check`; the CPU build is needed.
# So, conservatively:
#   torch 2.13.0: the version the whole project is pinned to and tested with
#   (pyproject.toml), after the 2.11.0 fix; the CPU-only build from the
#   PyTorch CPU index, because PyPI's aarch64 torch 2.13.0 depends on CUDA 13
#   packages (gigabytes a Pi cannot use).
#   onnxruntime 1.20.1: the last release before the 1.21 regression, and
#   reported working on the Pi 4; it runs our students (ONNX opset 17) and
#   works with numpy 2. The base install accepts any onnxruntime >= 1.17.
# The install ends with a smoke test that runs both on this CPU: a version
# that crashes here fails the install, not the first training run.
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL="${TORCH_INDEX_URL:-$TORCH_CPU_INDEX}"
ONNXRUNTIME_VERSION="${ONNXRUNTIME_VERSION:-1.20.1}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PREFIX=/opt/splitkd
SOURCE="$REPO"
WHEELHOUSE=""
SERVICE_USER=splitkd
INFERENCE_ONLY=0
DRY_RUN=0
SYSTEMD=1
CONFIG_DIR=/etc/splitkd
STATE_DIR=/var/lib/splitkd

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --inference-only) INFERENCE_ONLY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --source) SOURCE="$2"; shift 2 ;;
    --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
    --user) SERVICE_USER="$2"; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

say() { echo "==> $*"; }
run() {
  echo "+ $*"
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

# ---- Checks ------------------------------------------------------------------
if [ "$DRY_RUN" -eq 1 ]; then
  say "dry run: printing the commands, changing nothing"
elif [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run it as root (sudo), or with --dry-run" >&2
  exit 1
fi
machine="$(uname -m)"
if [ "$machine" != "aarch64" ]; then
  say "warning: this is $machine, not aarch64 (64-bit Raspberry Pi OS); the pins above are for the Pi"
fi
model=unknown
[ -r /proc/device-tree/model ] && model="$(tr -d '\0' </proc/device-tree/model)"
say "device: $model"
python_version="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)"
case "$python_version" in
  3.1[1-9]) say "python3 $python_version" ;;
  *) echo "install.sh: splitkd needs Python >= 3.11 (found $python_version)" >&2; exit 1 ;;
esac
if [ ! -e "$SOURCE/pyproject.toml" ] && [[ "$SOURCE" != *.whl ]]; then
  echo "install.sh: $SOURCE is neither a splitkd source tree nor a wheel" >&2
  exit 1
fi

if [ "$INFERENCE_ONLY" -eq 1 ]; then
  say "inference only: onnxruntime $ONNXRUNTIME_VERSION, no training stack"
  TARGET="$SOURCE"
else
  say "training and inference: torch $TORCH_VERSION (CPU build), onnxruntime $ONNXRUNTIME_VERSION"
  if [ "$TORCH_INDEX_URL" != "$TORCH_CPU_INDEX" ] && [ -z "$WHEELHOUSE" ]; then
    # Another index (PyPI, a mirror) serves the CUDA build for aarch64.
    say "warning: torch from $TORCH_INDEX_URL, not the PyTorch CPU index: an aarch64 torch from PyPI or a mirror of it is the CUDA build, with gigabytes of NVIDIA libraries"
  fi
  TARGET="${SOURCE}[train]"
fi

PIP=("$PREFIX/bin/pip" --disable-pip-version-check)
INDEX=()
TORCH_INDEX=(--index-url "$TORCH_INDEX_URL")
if [ -n "$WHEELHOUSE" ]; then
  INDEX=(--no-index --find-links "$WHEELHOUSE")
  TORCH_INDEX=("${INDEX[@]}")
fi

# ---- System packages and user -------------------------------------------------
say "system packages: python3-venv (Raspberry Pi OS Lite lacks it), iproute2"
if [ -n "$WHEELHOUSE" ] && dpkg -s python3-venv >/dev/null 2>&1; then
  say "python3-venv present; no apt-get in an offline install"
else
  run apt-get update -qq
  run apt-get install -y -qq python3-venv iproute2
fi
if id "$SERVICE_USER" >/dev/null 2>&1; then
  say "user $SERVICE_USER exists"
else
  run useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin "$SERVICE_USER"
fi
run install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE_DIR" "$STATE_DIR/models"

# ---- The virtual environment ----------------------------------------------------
say "virtual environment in $PREFIX"
run python3 -m venv "$PREFIX"
if [ -z "$WHEELHOUSE" ]; then
  run "${PIP[@]}" install --upgrade pip
fi
CONSTRAINTS="$PREFIX/constraints.txt"
say "pins in $CONSTRAINTS"
if [ "$INFERENCE_ONLY" -eq 1 ]; then
  pins="onnxruntime==$ONNXRUNTIME_VERSION"
else
  pins="$(printf 'torch==%s\nonnxruntime==%s' "$TORCH_VERSION" "$ONNXRUNTIME_VERSION")"
fi
while read -r line; do echo "    $line"; done <<<"$pins"
if [ "$DRY_RUN" -eq 0 ]; then
  echo "$pins" >"$CONSTRAINTS"
fi
if [ "$INFERENCE_ONLY" -eq 0 ]; then
  # torch alone first, from the CPU index: it then satisfies the [train]
  # extra's torch==2.13.0 and nothing pulls PyPI's CUDA build.
  run "${PIP[@]}" install "${TORCH_INDEX[@]}" "torch==$TORCH_VERSION"
fi
run "${PIP[@]}" install "${INDEX[@]}" -c "$CONSTRAINTS" "onnxruntime==$ONNXRUNTIME_VERSION" "$TARGET"

# ---- Smoke test on this CPU -------------------------------------------------------
# Exit status 132 is SIGILL: a wheel with instructions this CPU does not have.
smoke() {
  local what="$1" code="$2" status=0
  echo "+ $PREFIX/bin/python -c '<$what smoke test>'"
  [ "$DRY_RUN" -eq 1 ] && return 0
  "$PREFIX/bin/python" -c "$code" || status=$?
  if [ "$status" -eq 132 ]; then
    echo "install.sh: $what crashed with 'Illegal instruction' on this CPU; see the pins at the top of $0" >&2
    if [ "$what" = torch ] && [ "$TORCH_INDEX_URL" != "$TORCH_CPU_INDEX" ]; then
      echo "install.sh: this torch came from $TORCH_INDEX_URL: the aarch64 CUDA build's BLAS (NVPL) uses LSE atomics, which a Pi 4 lacks; install the CPU build" >&2
    fi
    exit 1
  elif [ "$status" -ne 0 ]; then
    echo "install.sh: the $what smoke test failed (exit $status)" >&2
    exit 1
  fi
}
smoke onnxruntime 'import numpy as np, onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'
if [ "$INFERENCE_ONLY" -eq 0 ]; then
  smoke torch 'import torch
x = torch.randn(32, 64, requires_grad=True)
(torch.nn.functional.relu(x @ torch.randn(64, 10)).sum()).backward()
print("torch", torch.__version__, "forward and backward ok")'
fi
smoke splitkd-edge 'import edge_agent.cli, edge_agent.http_api; print("splitkd-edge imports ok")'

# ---- Configuration and systemd --------------------------------------------------------
run install -d -m 0755 "$CONFIG_DIR"
if [ -e "$CONFIG_DIR/edge.env" ]; then
  say "$CONFIG_DIR/edge.env exists: kept"
else
  run install -m 0640 -o root -g "$SERVICE_USER" "$HERE/splitkd-edge.env" "$CONFIG_DIR/edge.env"
fi
if [ "$SYSTEMD" -eq 1 ]; then
  units=(splitkd-edge.service)
  [ "$INFERENCE_ONLY" -eq 0 ] && units+=(splitkd-edge-train.service)
  for unit in "${units[@]}"; do
    # The units name /opt/splitkd and the splitkd user; follow --prefix and --user.
    echo "+ sed ... $HERE/$unit > /etc/systemd/system/$unit"
    if [ "$DRY_RUN" -eq 0 ]; then
      sed -e "s#/opt/splitkd#$PREFIX#g" -e "s#^User=splitkd#User=$SERVICE_USER#" \
        -e "s#^Group=splitkd#Group=$SERVICE_USER#" "$HERE/$unit" >"/etc/systemd/system/$unit"
    fi
  done
  if [ -d /run/systemd/system ] || [ "$DRY_RUN" -eq 1 ]; then
    run systemctl daemon-reload
    run systemctl enable --now splitkd-edge.service
  else
    # No running systemd (a chroot, a container, an SD-card image being
    # built): systemctl would fail here, after the whole install. Enable the
    # unit for the next boot instead.
    say "systemd is not running here: splitkd-edge.service is enabled for the next boot, not started"
    run systemctl --root=/ enable splitkd-edge.service
  fi
fi

say "done. Next: edit $CONFIG_DIR/edge.env (the cloud's address, this device's id and data),"
if [ "$INFERENCE_ONLY" -eq 1 ]; then
  say "then: sudo -u $SERVICE_USER $PREFIX/bin/splitkd-edge pull --cloud-http http://CLOUD:8000 --model student-NAME --model-dir $STATE_DIR/models"
elif [ "$SYSTEMD" -eq 1 ]; then
  say "then: sudo systemctl start splitkd-edge-train   (journalctl -fu splitkd-edge-train to follow it)"
else
  say "then, as $SERVICE_USER: set -a; . $CONFIG_DIR/edge.env; set +a; $PREFIX/bin/splitkd-edge train"
fi
say "the inference API: http://$(hostname).local:8001/healthz; docs/RASPBERRY_PI.md has the rest"
