#!/usr/bin/env bash
# make compose-check: build the splitkd images and run the docker compose
# testbed for real, on a machine with no image registry.
#
#  1. installs docker.io, docker-compose and debootstrap when missing (apt-get)
#     and starts dockerd when no engine answers;
#  2. builds the base image with debootstrap when absent
#     (deploy/docker/make-base-image.sh) and the wheelhouse when empty
#     (deploy/docker/build-wheelhouse.sh), so the image builds need no network;
#  3. builds the images and brings the stack up: docker-compose.yml plus
#     deploy/docker/compose.local.yml, which builds Prometheus from Debian's
#     package and leaves Grafana out (no Debian package, no registry). With
#     SPLITKD_COMPOSE_REGISTRY=1 (or both registry images already present) the
#     plain docker-compose.yml runs, Grafana included;
#  4. waits until every service is healthy (an edge is healthy once its student
#     is trained, exported, downloaded and served), checks that Prometheus has
#     every target up and scraped the training series, and that every edge
#     answers POST /v1/predict on real digits;
#  5. tears the stack down (and stops the dockerd it started), also on failure.
#
# Environment: SPLITKD_EPOCHS (20 here), COMPOSE_CHECK_TIMEOUT (seconds, 1800),
# KEEP_STACK=1 (leave it running), KEEP_DOCKERD=1 (leave a started dockerd).
# Needs root (apt-get, dockerd, debootstrap).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PROJECT=splitkd-check
TIMEOUT="${COMPOSE_CHECK_TIMEOUT:-1800}"
BASE_IMAGE="${SPLITKD_BASE_IMAGE:-splitkd/base:bookworm}"
REGISTRY_IMAGES=(prom/prometheus:v3.5.0 grafana/grafana:12.2.1)
# Host ports away from the defaults, so a stack or a test already running on
# this machine does not collide with the check.
export SPLITKD_CLOUD_HTTP_PORT=18000 SPLITKD_CLOUD_GRPC_PORT=15051 SPLITKD_PROMETHEUS_PORT=19090 \
  SPLITKD_EDGE0_PORT=18101 SPLITKD_EDGE1_PORT=18102 SPLITKD_EDGE2_PORT=18103 SPLITKD_GRAFANA_PORT=13000
# Fewer epochs than the testbed's 60: the check proves the pipeline, not accuracy.
export SPLITKD_EPOCHS="${SPLITKD_EPOCHS:-20}"
export SPLITKD_BASE_IMAGE="$BASE_IMAGE"

START=$(date +%s)
say() { printf '[%5ds] %s\n' "$(($(date +%s) - START))" "$*"; }
fail() { say "FAIL: $*"; exit 1; }

# ---------------------------------------------------------------- 1. engine --
if [ "$(id -u)" -ne 0 ]; then
  echo "compose-check: needs root (apt-get, dockerd, debootstrap)" >&2
  exit 1
fi
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

DOCKERD_PID=""
if ! docker info >/dev/null 2>&1; then
  # dockerd sets the FORWARD policy to DROP when it enables forwarding, which
  # cuts off other bridges on this host (the network-namespace testbed's
  # veths, for one); put the policy back as it was once it is up.
  forward_policy="$(iptables -S FORWARD 2>/dev/null | awk '/^-P FORWARD/ {print $3}')"
  say "starting dockerd (log: /tmp/splitkd-dockerd.log)"
  dockerd >/tmp/splitkd-dockerd.log 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not start; see /tmp/splitkd-dockerd.log"
  [ -n "$forward_policy" ] && iptables -P FORWARD "$forward_policy"
fi
say "docker engine $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}')"

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  COMPOSE=(docker-compose)
fi
say "compose: $("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -1)"

REGISTRY="${SPLITKD_COMPOSE_REGISTRY:-}"
if [ -z "$REGISTRY" ]; then
  REGISTRY=1
  for image in "${REGISTRY_IMAGES[@]}"; do
    docker image inspect "$image" >/dev/null 2>&1 || REGISTRY=0
  done
fi
FILES=(-f docker-compose.yml)
LEFT_OUT="none"
if [ "$REGISTRY" != "1" ]; then
  FILES+=(-f deploy/docker/compose.local.yml)
  LEFT_OUT="grafana (no local image can be made: no registry, no Debian package)"
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" "$@"; }
compose config -q || fail "the compose files do not parse"
say "compose files: ${FILES[*]}; left out: $LEFT_OUT"

STATUS=1
cleanup() {
  local rc=$?
  if [ "$STATUS" -ne 0 ]; then
    say "logs of the failed run (last 60 lines per service):"
    compose logs --no-color --tail=60 2>&1 || true
  fi
  if [ "${KEEP_STACK:-0}" = "1" ]; then
    say "KEEP_STACK=1: the stack keeps running (compose -p $PROJECT ${FILES[*]} down -v to end it)"
  else
    say "tearing down"
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  if [ -n "$DOCKERD_PID" ] && [ "${KEEP_DOCKERD:-0}" != "1" ]; then
    say "stopping the dockerd this check started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ 2. base, wheels --
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  if [ "$BASE_IMAGE" != "splitkd/base:bookworm" ]; then
    fail "base image $BASE_IMAGE is missing and only splitkd/base:bookworm can be made here"
  fi
  say "no $BASE_IMAGE: debootstrapping it"
  t0=$(date +%s)
  deploy/docker/make-base-image.sh --tag "$BASE_IMAGE" 2>&1 | grep -v '^I: ' || fail "make-base-image.sh failed"
  say "base image made in $(($(date +%s) - t0)) s"
else
  say "base image $BASE_IMAGE present ($(docker image inspect --format '{{.Created}}' "$BASE_IMAGE"))"
fi
if ! compgen -G "build/wheelhouse/torch-*.whl" >/dev/null; then
  say "no wheelhouse: filling build/wheelhouse"
  deploy/docker/build-wheelhouse.sh 2>&1 | grep -E '^build-wheelhouse' || fail "build-wheelhouse.sh failed"
fi
say "wheelhouse: $(find build/wheelhouse -name '*.whl' | wc -l) wheels, $(du -sh build/wheelhouse | cut -f1)"

# -------------------------------------------------------------------- 3. up --
t0=$(date +%s)
say "building images (log: /tmp/splitkd-compose-build.log)"
if ! compose build >/tmp/splitkd-compose-build.log 2>&1; then
  tail -40 /tmp/splitkd-compose-build.log
  fail "image build failed"
fi
grep -E '^(Building |Successfully tagged )' /tmp/splitkd-compose-build.log | sed 's/^/    /' || true
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^splitkd/' | sed 's/^/    /'
say "images built in $(($(date +%s) - t0)) s"

t0=$(date +%s)
say "docker compose up (SPLITKD_EPOCHS=$SPLITKD_EPOCHS)"
compose up -d 2>&1 | sed 's/^/    /'
# The services that run: those with a container (a service in a profile that
# is not enabled has none).
SERVICES=()
while read -r service; do
  [ -n "$(compose ps -q "$service" 2>/dev/null)" ] && SERVICES+=("$service")
done < <(compose config --services | sort)
say "running: ${SERVICES[*]}"

# ---------------------------------------------------------------- 4. checks --
container() { compose ps -q "$1"; }
state() {
  docker inspect --format '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.RestartCount}}' "$(container "$1")"
}

say "waiting for every service to be healthy (edges: trained, deployed, serving)"
declare -A last
while :; do
  all=1
  for service in "${SERVICES[@]}"; do
    read -r status health restarts < <(state "$service")
    if [ "${last[$service]:-}" != "$status/$health" ]; then
      say "  $service: $status, $health"
      last[$service]="$status/$health"
    fi
    [ "$status" = "running" ] || fail "$service is $status"
    [ "$restarts" -eq 0 ] || fail "$service restarted $restarts times"
    [ "$health" = "healthy" ] || all=0
  done
  [ "$all" -eq 1 ] && break
  [ $(($(date +%s) - t0)) -lt "$TIMEOUT" ] || fail "not healthy after $TIMEOUT s"
  sleep 5
done
say "all healthy $(($(date +%s) - t0)) s after up"

say "training runs, from the edges' logs:"
for service in "${SERVICES[@]}"; do
  case "$service" in edge-*) ;; *) continue ;; esac
  compose logs --no-color "$service" 2>/dev/null \
    | grep -E 'student .* accuracy|edge-entrypoint: (link emulator|training|serving)|shape-link: .* as |installed student' \
    | sed -e 's/^[^|]*| //' -e 's/^/    /' || true
done

CLOUD="http://127.0.0.1:$SPLITKD_CLOUD_HTTP_PORT"
say "cloud models:"
curl -fsS "$CLOUD/v1/models" | python3 -c '
import json, sys
for m in json.load(sys.stdin)["models"]:
    print("    %s: latest v%s" % (m["name"], m["latest"]))
'

if printf '%s\n' "${SERVICES[@]}" | grep -qx prometheus; then
  PROM="http://127.0.0.1:$SPLITKD_PROMETHEUS_PORT"
  say "Prometheus targets:"
  for _ in $(seq 24); do
    targets="$(curl -fsS "$PROM/api/v1/targets")"
    down="$(python3 -c 'import json, sys; t = json.load(sys.stdin)["data"]["activeTargets"]; print(sum(x["health"] != "up" for x in t) if t else 1)' <<<"$targets")"
    [ "$down" = "0" ] && break
    sleep 5
  done
  python3 -c '
import json, sys
for t in sorted(json.load(sys.stdin)["data"]["activeTargets"], key=lambda t: t["scrapeUrl"]):
    labels = t["labels"]
    print("    %-14s %-30s device=%-7s %s" % (labels["job"], t["scrapeUrl"], labels.get("device", "-"), t["health"]))
' <<<"$targets"
  [ "$down" = "0" ] || fail "$down Prometheus targets are not up"
  say "every Prometheus target is up"
  query() { curl -fsS --data-urlencode "query=$1" "$PROM/api/v1/query"; }
  say "training steps each edge reported while it trained, as Prometheus scraped them:"
  query 'max by (device) (max_over_time(splitkd_edge_training_steps_total[1h]))' | python3 -c '
import json, sys
result = json.load(sys.stdin)["data"]["result"]
for r in sorted(result, key=lambda r: r["metric"].get("device", "")):
    print("    %s: %.0f steps" % (r["metric"].get("device"), float(r["value"][1])))
if not result:
    sys.exit("no training series scraped")
' || fail "Prometheus holds no training series"
  query 'max_over_time(splitkd_cloud_training_steps_total[1h])' | python3 -c '
import json, sys
result = json.load(sys.stdin)["data"]["result"]
print("    cloud: %.0f steps" % float(result[0]["value"][1]) if result else "    cloud: none")
'
fi

say "POST /v1/predict on every edge, 10 digits (held in the edge-0 image's scikit-learn):"
payload="$(compose exec -T edge-0 python -c '
import json
from sklearn.datasets import load_digits
d = load_digits()
picks = list(range(0, 1797, 180))[:10]
print(json.dumps({"inputs": [(d.images[i] / 16.0)[None].tolist() for i in picks],
                  "labels": [int(d.target[i]) for i in picks]}))
')"
for service in "${SERVICES[@]}"; do
  case "$service" in edge-*) ;; *) continue ;; esac
  port_var="SPLITKD_EDGE${service#edge-}_PORT"
  answer="$(python3 -c 'import json, sys; p = json.loads(sys.argv[1]); print(json.dumps({"inputs": p["inputs"]}))' "$payload" \
    | curl -fsS -X POST -H 'content-type: application/json' --data-binary @- "http://127.0.0.1:${!port_var}/v1/predict")" \
    || fail "$service: /v1/predict failed"
  python3 -c '
import json, sys
service, payload, answer = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
classes = [p["class"] for p in answer["predictions"]]
right = sum(c == y for c, y in zip(classes, payload["labels"]))
model = answer["model"]
print("    %s: %s v%s: predicted %s, labels %s, %d/%d right, %.2f ms"
      % (service, model["name"], model["version"], classes, payload["labels"], right, len(classes),
         answer["seconds"] * 1000))
if right < len(classes) // 2:
    sys.exit(service + ": fewer than half right")
' "$service" "$payload" "$answer" || fail "$service answers wrongly"
done

STATUS=0
say "compose-check passed: ${SERVICES[*]} ran (left out: $LEFT_OUT); $(($(date +%s) - START)) s in all"
