#!/usr/bin/env bash
# Build the splitkd base image without any container registry: debootstrap a
# minimal Debian bookworm root file system with python3.11, python3-venv,
# iproute2 (tc, ip), libcap2-bin (setcap) and ca-certificates, and `docker
# import` it.
#
# The Dockerfiles in this folder start FROM this tag (ARG BASE_IMAGE). Where a
# registry is reachable, `--build-arg BASE_IMAGE=python:3.11-slim-bookworm`
# gives an equivalent base instead and this script is not needed.
#
# Usage: deploy/docker/make-base-image.sh [--tag TAG] [--mirror URL] [--arch ARCH] [--force]
# Needs root, debootstrap and a running Docker engine.
set -euo pipefail

TAG="splitkd/base:bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ARCH=""
FORCE=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG="$2"; shift 2 ;;
    --mirror) MIRROR="$2"; shift 2 ;;
    --arch) ARCH="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "make-base-image: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "make-base-image: debootstrap needs root" >&2
  exit 1
fi
for tool in debootstrap docker tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "make-base-image: $tool not found" >&2; exit 1; }
done
if [ "$FORCE" -eq 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "make-base-image: $TAG exists (use --force to rebuild)"
  exit 0
fi

ROOTFS="$(mktemp -d /tmp/splitkd-rootfs.XXXXXX)"
cleanup() { rm -rf "$ROOTFS"; }
trap cleanup EXIT

# minbase: only Essential and apt; the packages below are all the images need.
# iproute2 gives tc and ip for the edge's link shaping, libcap2-bin setcap for its
# netadmin helper; python3-venv brings ensurepip. No curl: health checks use python.
INCLUDE="python3.11,python3-venv,iproute2,libcap2-bin,ca-certificates"
ARCH_FLAG=()
if [ -n "$ARCH" ]; then
  # A foreign architecture (e.g. arm64 on an x86 host) needs qemu-user-static
  # registered with binfmt_misc (apt-get install qemu-user-static binfmt-support);
  # debootstrap then runs the foreign second stage through it.
  ARCH_FLAG=(--arch "$ARCH")
fi
echo "make-base-image: debootstrap bookworm ($MIRROR) into $ROOTFS"
debootstrap --variant=minbase "${ARCH_FLAG[@]}" --include="$INCLUDE" bookworm "$ROOTFS" "$MIRROR"

# Trim what a container never uses: apt lists, caches, docs, man pages, locales.
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
  "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*
find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
# Keep apt usable inside derived images (e.g. the local Prometheus image).
echo "deb $MIRROR bookworm main" >"$ROOTFS/etc/apt/sources.list"

echo "make-base-image: importing as $TAG"
tar -C "$ROOTFS" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  - "$TAG"
docker run --rm "$TAG" python3.11 --version
echo "make-base-image: done: $TAG ($(docker image inspect --format '{{.Size}}' "$TAG") bytes)"
