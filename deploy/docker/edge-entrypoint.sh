#!/usr/bin/env bash
# Entry point of the splitkd edge images: shape this container's link like its
# link profile, get a student (split-train it with the cloud, or pull one the
# cloud already has), then serve it, for as long as the container runs.
#
# Configuration, all from the environment (docker-compose.yml sets them):
#   SPLITKD_EDGE_MODE      train (splitkd/edge), pull (splitkd/edge-infer) or serve
#   SPLITKD_CLOUD          train: cloud gRPC address, e.g. cloud:50051
#   SPLITKD_DATA, SPLITKD_SHARD, SPLITKD_DEVICE_ID, SPLITKD_DEVICE_PROFILE,
#   SPLITKD_LINK_PROFILE   train: read by `splitkd-edge train` itself
#   SPLITKD_EPOCHS         train: epochs (default 0: the cloud's setting)
#   SPLITKD_RETRAIN        train: 1 to train even when a student is installed
#   SPLITKD_CLOUD_HTTP     pull: cloud HTTP base URL, e.g. http://cloud:8000
#   SPLITKD_PULL_MODEL     pull: model to install, e.g. student-edge-0
#   SPLITKD_PULL_INTERVAL  pull: seconds between tries until it exists (10)
#   SPLITKD_HTTP_PORT      serve port (8001); while training, /metrics is on it
#   SPLITKD_SHAPE_LINK     auto (shape when SPLITKD_LINK_PROFILE is set, go on
#                          unshaped when not permitted), required, or off
#   SPLITKD_LINK_INTERFACE interface to shape (eth0)
#   SPLITKD_LINK_LATENCY   train: how the profile's latency and jitter are added:
#                          auto (netem when the kernel has it, else the
#                          user-space link emulator between this edge and the
#                          cloud), proxy (always the emulator) or off
set -euo pipefail

MODE="${SPLITKD_EDGE_MODE:-train}"
PORT="${SPLITKD_HTTP_PORT:-8001}"
MODEL_DIR="${SPLITKD_MODEL_DIR:-/var/lib/splitkd/models}"
SHAPE="${SPLITKD_SHAPE_LINK:-auto}"
LINK="${SPLITKD_LINK_PROFILE:-}"
NETADMIN=/usr/local/libexec/splitkd/netadmin
LINKEMU=/usr/local/libexec/splitkd/linkemu.py
# Where the edge reaches the cloud through the link emulator, when it runs.
LINKEMU_LISTEN=127.0.0.1:50100

log() { echo "edge-entrypoint: $*"; }

# PID 1 ignores SIGTERM unless it handles it: pass it on to the child, so that
# `docker stop` ends a training run at once instead of after the kill timeout.
child=0
emulator=0
forward() {
  if [ "$child" -ne 0 ]; then kill -TERM "$child" 2>/dev/null || true; fi
  if [ "$emulator" -ne 0 ]; then kill -TERM "$emulator" 2>/dev/null || true; fi
  exit 143
}
trap forward TERM INT

shape_link() {
  [ "$SHAPE" = "off" ] && return 0
  if [ -z "$LINK" ]; then
    [ "$SHAPE" = "required" ] && { log "SPLITKD_SHAPE_LINK=required but no SPLITKD_LINK_PROFILE"; exit 2; }
    return 0
  fi
  # The image's netadmin helper passes CAP_NET_ADMIN (when the container has
  # it) to the shaping script; run as root, the script needs no helper.
  local helper=()
  if [ "$(id -u)" -ne 0 ] && [ -x "$NETADMIN" ]; then
    helper=("$NETADMIN" --inh-caps +net_admin --ambient-caps +net_admin --)
  fi
  if "${helper[@]}" splitkd-shape-link "$LINK" "${SPLITKD_LINK_INTERFACE:-eth0}"; then
    return 0
  fi
  if [ "$SHAPE" = "required" ]; then
    log "cannot shape the link (is the container started with cap_add NET_ADMIN?)"
    exit 2
  fi
  log "warning: link not shaped (needs cap_add NET_ADMIN); training runs at the container network's speed"
}

has_model() { [ -f "$MODEL_DIR/CURRENT.json" ]; }

# Latency and jitter: netem does it inside the kernel when it is there (the
# shaping above then shows a netem qdisc); otherwise the project's user-space
# link emulator (testbed/linkemu.py) sits between this edge and the cloud.
# Sets CLOUD_VIA, the gRPC address training uses.
start_latency() {
  local mode="${SPLITKD_LINK_LATENCY:-auto}"
  CLOUD_VIA="${SPLITKD_CLOUD:?set SPLITKD_CLOUD}"
  if [ -z "$LINK" ] || [ "$mode" = "off" ] || [ ! -f "$LINKEMU" ]; then
    return 0
  fi
  if [ "$mode" = "auto" ] && tc qdisc show dev "${SPLITKD_LINK_INTERFACE:-eth0}" 2>/dev/null | grep -q netem; then
    return 0
  fi
  python3 "$LINKEMU" --listen "$LINKEMU_LISTEN" --connect "$CLOUD_VIA" --profile "$LINK" &
  emulator=$!
  # Up to 10 s for it to listen; the python start-up takes about a second.
  local tries=0
  until (exec 3<>"/dev/tcp/${LINKEMU_LISTEN%:*}/${LINKEMU_LISTEN##*:}") 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -ge 50 ] || ! kill -0 "$emulator" 2>/dev/null; then
      log "the link emulator did not start"
      exit 1
    fi
    sleep 0.2
  done
  log "link emulator (pid $emulator) adds the '$LINK' latency and jitter between this edge and $CLOUD_VIA"
  CLOUD_VIA="$LINKEMU_LISTEN"
}

train() {
  if has_model && [ "${SPLITKD_RETRAIN:-0}" != "1" ]; then
    log "a student is installed in $MODEL_DIR: not training again (SPLITKD_RETRAIN=1 to retrain)"
    return 0
  fi
  start_latency
  log "training with the cloud at $SPLITKD_CLOUD (connecting to $CLOUD_VIA); metrics on :$PORT/metrics while it trains"
  splitkd-edge train --cloud "$CLOUD_VIA" --epochs "${SPLITKD_EPOCHS:-0}" --model-dir "$MODEL_DIR" \
    --metrics-port "$PORT" --no-progress --no-plots &
  child=$!
  local status=0
  wait "$child" || status=$?
  child=0
  if [ "$emulator" -ne 0 ]; then
    kill -TERM "$emulator" 2>/dev/null || true
    wait "$emulator" 2>/dev/null || true
    emulator=0
  fi
  if [ "$status" -ne 0 ]; then
    log "training failed (exit $status)"
    exit "$status"
  fi
  log "training done, student installed"
}

pull() {
  local model="${SPLITKD_PULL_MODEL:?set SPLITKD_PULL_MODEL}"
  local interval="${SPLITKD_PULL_INTERVAL:-10}"
  if has_model; then
    log "a student is installed in $MODEL_DIR"
    return 0
  fi
  log "waiting for $model at ${SPLITKD_CLOUD_HTTP:?set SPLITKD_CLOUD_HTTP}"
  until splitkd-edge pull --model "$model" --model-dir "$MODEL_DIR"; do
    sleep "$interval" &
    child=$!
    wait "$child" || true
    child=0
  done
}

mkdir -p "$MODEL_DIR"
case "$MODE" in
  train) shape_link; train ;;
  pull) shape_link; pull ;;
  serve) shape_link ;;
  *) log "unknown SPLITKD_EDGE_MODE '$MODE' (train, pull or serve)"; exit 2 ;;
esac
log "serving on :$PORT (POST /v1/predict, GET /healthz, GET /metrics)"
exec splitkd-edge serve --host 0.0.0.0 --http-port "$PORT" --model-dir "$MODEL_DIR"
