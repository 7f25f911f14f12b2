#!/usr/bin/env bash
# make pi-check: run deploy/raspberry-pi/install.sh for real on an emulated
# Raspberry Pi CPU (arm64 Debian bookworm in a chroot, qemu-user with
# QEMU_CPU=cortex-a72 for the Pi 4 and cortex-a76 for the Pi 5), the way
# docs/RASPBERRY_PI.md tells a Pi owner, against a cloud running natively here.
#
#  1. installs qemu-user-static, binfmt-support and debootstrap when missing,
#     mounts binfmt_misc, builds the arm64 root file system once (debootstrap
#     into a temporary folder, then moved into place) and caches it;
#  2. starts splitkd-cloud natively on loopback and a short native edge run,
#     which publishes the student the Pis pull;
#  3. per board, in a fresh copy of the root file system: the inference-only
#     install, then pull, serve (in a 512 MB memory cgroup) and predict;
#     systemd-analyze verify on the installed units;
#  4. with --train (PI_TRAIN=1): the training install and a short
#     `splitkd-edge train` against the cloud over loopback;
#  5. writes runs/pi-check/report.{json,md} and prints the table.
#
# Usage: sudo scripts/pi_check.sh [--board pi4|pi5|both] [--train]
#                                 [--torch-from-registry] [--epochs N] [--keep]
#   --train-only           the training stage alone (implies --train)
#   --torch-from-registry  when download.pytorch.org (the installer's CPU
#                          index) is unreachable, install the registry's
#                          torch instead: on aarch64 that is the CUDA build
#                          (~4.7 GB venv), which no Pi should get; the report
#                          says so.
# Environment: PI_CHECK_CACHE (root file systems, default
# /var/cache/splitkd-pi), PI_CHECK_OUT (default runs/pi-check), PI_CHECK_PYTHON (the host's splitkd python, default
# .venv/bin/python), PI_TRAIN=1 (= --train).
# Figures under emulation are not a Pi's: qemu translates every instruction
# (latency is many times a real board's) and its translator adds memory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BOARDS=(pi4 pi5)
TRAIN="${PI_TRAIN:-0}"
TORCH_FROM_REGISTRY=0
EPOCHS=3
KEEP=0
CACHE="${PI_CHECK_CACHE:-/var/cache/splitkd-pi}"
PY="${PI_CHECK_PYTHON:-$ROOT/.venv/bin/python}"
BINFMT_DIR="${PI_CHECK_BINFMT_DIR:-/proc/sys/fs/binfmt_misc}"
OUT="${PI_CHECK_OUT:-$ROOT/runs/pi-check}"
INFERENCE=1
MEMORY_LIMIT_MB=512
PREDICTS=30
EXTRA_NOTES=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --board)
      case "${2:-}" in
        pi4 | pi5) BOARDS=("$2") ;;
        both) BOARDS=(pi4 pi5) ;;
        *) echo "pi-check: --board takes pi4, pi5 or both" >&2; exit 2 ;;
      esac
      shift 2 ;;
    --train) TRAIN=1; shift ;;
    --train-only) TRAIN=1; INFERENCE=0; shift ;;
    --torch-from-registry) TORCH_FROM_REGISTRY=1; shift ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "pi-check: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

START=$(date +%s)
say() { printf '[%5ds] %s\n' "$(($(date +%s) - START))" "$*"; }
fail() { say "FAIL: $*"; exit 1; }

# ---------------------------------------------------------------- 1. host --
if [ ! -d "$BINFMT_DIR" ]; then
  echo "pi-check: this kernel has no binfmt_misc ($BINFMT_DIR is missing): qemu-user cannot run arm64 programs" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "pi-check: needs root (apt-get, binfmt_misc, debootstrap, chroot, cgroups)" >&2
  exit 1
fi
[ -x "$PY" ] || fail "no splitkd python at $PY (make venv, or set PI_CHECK_PYTHON)"

missing=()
[ -e /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null 2>&1 || missing+=(binfmt-support)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -e "$BINFMT_DIR/register" ]; then
  mount -t binfmt_misc binfmt_misc "$BINFMT_DIR" ||
    { echo "pi-check: cannot mount binfmt_misc on $BINFMT_DIR" >&2; exit 1; }
fi
[ -e "$BINFMT_DIR/qemu-aarch64" ] || update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
if ! grep -qx enabled "$BINFMT_DIR/qemu-aarch64" 2>/dev/null; then
  echo "pi-check: no binfmt support for arm64 ($BINFMT_DIR/qemu-aarch64 is not enabled)" >&2
  exit 1
fi

# ------------------------------------------------------------ root file system --
BASE="$CACHE/bookworm-arm64"
mkdir -p "$CACHE" "$OUT"
if [ ! -e "$BASE/.splitkd-ready" ]; then
  tmp="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  say "building the arm64 root file system in $tmp (debootstrap, a few minutes; log $OUT/debootstrap.log)"
  # systemd: Raspberry Pi OS has it, and the installer enables its units.
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,systemd \
    bookworm "$tmp" http://deb.debian.org/debian >"$OUT/debootstrap.log" 2>&1 ||
    { rm -rf "$tmp"; fail "debootstrap failed; see $OUT/debootstrap.log"; }
  touch "$tmp/.splitkd-ready"
  rm -rf "$BASE"
  mv "$tmp" "$BASE"
fi
say "root file system: $BASE ($(du -sm "$BASE" | cut -f1) MB)"

# ------------------------------------------------------------ the chroot --
RESULTS="$OUT/results.tsv"
: >"$RESULTS"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }
free_port() { "$PY" -c 'from splitkd.demo import free_port; print(free_port())'; }
cpu_of() { case "$1" in pi4) echo cortex-a72 ;; pi5) echo cortex-a76 ;; esac; }
# MIDR_EL1 of the board's core: oneDNN (inside torch) reads it from sysfs at
# `import torch` and crashes under qemu-user when it is missing.
midr_of() { case "$1" in pi4) echo 0x00000000410fd083 ;; pi5) echo 0x00000000414fd0b1 ;; esac; }

WORK=""
WRAP=()
MOUNTS=()
CGROUP=""
PIDS=()
# Stop what one board's stage started, unmount, remove its copy.
cleanup() {
  local pid m i procs
  if [ -n "$CGROUP" ] && [ -d "$CGROUP" ]; then
    # cgroup files report size 0: read them. A cgroup goes only once empty.
    for _ in $(seq 50); do
      procs="$(cat "$CGROUP/cgroup.procs")"
      [ -z "$procs" ] && rmdir "$CGROUP" 2>/dev/null && break
      for pid in $procs; do kill -9 "$pid" 2>/dev/null || true; done
      sleep 0.2
    done
  fi
  CGROUP=""
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  PIDS=()
  # Whatever still runs inside the chroot (an install cut short): by pid,
  # found by its root directory.
  if [ -n "$WORK" ]; then
    for m in /proc/[0-9]*; do
      [ "$(readlink "$m/root" 2>/dev/null)" = "$WORK" ] && kill -9 "${m#/proc/}" 2>/dev/null
    done
  fi
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    m="${MOUNTS[$i]}"
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  MOUNTS=()
  if [ -n "$WORK" ] && [ "$KEEP" -eq 0 ]; then rm -rf --one-file-system "$WORK"; fi
  WORK=""
}
CLOUD_PID=""
NATIVE_PID=""
finish() {
  cleanup
  if [ -n "$NATIVE_PID" ]; then pkill -P "$NATIVE_PID" 2>/dev/null || true; kill "$NATIVE_PID" 2>/dev/null || true; fi
  if [ -n "$CLOUD_PID" ]; then kill "$CLOUD_PID" 2>/dev/null || true; wait "$CLOUD_PID" 2>/dev/null || true; fi
}
trap finish EXIT

bind() { mount --bind "$1" "$2"; MOUNTS+=("$2"); }

# A fake /sys/devices/system/cpu: as many CPUs as this host gives us (at
# most the Pi's 4), each with the board's MIDR_EL1. An emulation artefact:
# a Pi's kernel provides the real one.
fake_sysfs() {
  local dir="$1" midr="$2" n i
  n="$(nproc)"; [ "$n" -gt 4 ] && n=4
  mkdir -p "$dir/devices/system/cpu"
  for f in possible present online; do echo "0-$((n - 1))" >"$dir/devices/system/cpu/$f"; done
  for ((i = 0; i < n; i++)); do
    mkdir -p "$dir/devices/system/cpu/cpu$i/regs/identification"
    echo "$midr" >"$dir/devices/system/cpu/cpu$i/regs/identification/midr_el1"
    echo 0x0000000000000000 >"$dir/devices/system/cpu/cpu$i/regs/identification/revidr_el1"
    echo 1 >"$dir/devices/system/cpu/cpu$i/online"
  done
}

# A fresh copy of the root file system for one board and stage, with what a
# Pi owner's machine has and a chroot lacks: name resolution, and the host's
# CA bundle and pip configuration (this network's registry presents
# certificates from the host's CA, which Debian's bundle does not carry).
prepare() {
  local board="$1" stage="$2"
  WORK="$CACHE/work-$board-$stage"
  rm -rf --one-file-system "$WORK"
  cp -a "$BASE" "$WORK"
  cp /etc/resolv.conf "$WORK/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndefault-timeout = 180\n' >"$WORK/etc/pip.conf"
  # The host's extra indexes are file:// folders of x86-64 wheels: of no use
  # to an arm64 pip, and absent inside the chroot. Only the cert carries over.
  # And the host's apt settings for reaching its mirror (a proxy, snapshot validity).
  local f
  grep -l -E 'Acquire::(https?::)?Proxy|Check-Valid-Until' /etc/apt/apt.conf.d/* 2>/dev/null |
    while read -r f; do cp "$f" "$WORK$f"; done
  mount -t proc proc "$WORK/proc"; MOUNTS+=("$WORK/proc")
  bind /dev "$WORK/dev"
  # /dev/shm is its own tmpfs (1777): without it, joblib (scikit-learn) falls back to serial.
  bind /dev/shm "$WORK/dev/shm"
  mkdir -p "$WORK/run/fakesys"
  fake_sysfs "$CACHE/sys-$board" "$(midr_of "$board")"
  bind "$CACHE/sys-$board" "$WORK/sys"
  # The repository as a Pi owner clones it: the tracked files of this tree.
  mkdir -p "$WORK/root/splitkd"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) |
    tar -xf - -C "$WORK/root/splitkd"
}

# Run a command inside the chroot on the board's emulated CPU, with a clean
# environment (what a login shell on the Pi has).
in_pi() {
  local cpu="$1"; shift
  "${WRAP[@]}" env QEMU_CPU="$cpu" chroot "$WORK" /usr/bin/env -i QEMU_CPU="$cpu" HOME=/root LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
# As the service user, with /etc/splitkd/edge.env like the systemd units.
as_splitkd() {
  local cpu="$1" cmd="$2"
  in_pi "$cpu" runuser -u splitkd -- /bin/bash -c \
    "set -a; . /etc/splitkd/edge.env; set +a; cd /var/lib/splitkd; $cmd"
}

# ----------------------------------------------------------- 2. the cloud --
# It runs natively on loopback (the chroot shares this host's network). The
# teacher it trains at its first start is cached; the native edge run that
# publishes student-native-0 goes on in the background while the Pis install.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
GRPC_PORT="$(free_port)"
HTTP_PORT="$(free_port)"
CLOUD_HTTP="http://127.0.0.1:$HTTP_PORT"
TEACHER="$CACHE/teacher-digits.safetensors"
rm -rf "$OUT/cloud" "$OUT/native"
teacher_args=(--teacher-data digits)
[ -e "$TEACHER" ] && teacher_args=(--teacher "$TEACHER")
say "cloud: natively on 127.0.0.1 (gRPC $GRPC_PORT, HTTP $HTTP_PORT), $EPOCHS epochs, ${teacher_args[*]}; log $OUT/cloud.log"
"$PY" -m cloud_service.cli serve --host 127.0.0.1 --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
  "${teacher_args[@]}" --state-dir "$OUT/cloud" --epochs "$EPOCHS" >"$OUT/cloud.log" 2>&1 &
CLOUD_PID=$!
publish_student() {
  for _ in $(seq 1800); do
    curl -fsS "$CLOUD_HTTP/healthz" >/dev/null 2>&1 && break
    kill -0 "$CLOUD_PID" 2>/dev/null || { echo "the cloud exited; see $OUT/cloud.log"; return 1; }
    sleep 1
  done
  curl -fsS "$CLOUD_HTTP/healthz" >/dev/null || { echo "the cloud did not answer /healthz in 30 minutes"; return 1; }
  [ -e "$TEACHER" ] || cp "$OUT/cloud/teacher.safetensors" "$TEACHER"
  "$PY" -m edge_agent.cli train --cloud "127.0.0.1:$GRPC_PORT" --data digits --shard 0/2 \
    --device-id native-0 --epochs "$EPOCHS" --report "$OUT/native/report.json" --no-plots \
    --no-progress --model-dir "$OUT/native/models" --checkpoint-dir "$OUT/native/checkpoints" ||
    { echo "the native training run failed"; return 1; }
}
publish_student >"$OUT/native.log" 2>&1 &
NATIVE_PID=$!
NATIVE_DONE=0
wait_for_student() {
  [ "$NATIVE_DONE" -eq 1 ] && return 0
  say "waiting for the native edge run to publish student-native-0 (log $OUT/native.log)"
  wait "$NATIVE_PID" || fail "no student: $(tail -n 1 "$OUT/native.log")"
  NATIVE_DONE=1
  tail -n 1 "$OUT/native.log" | sed 's/^/    /'
}
# One real digit, scaled as splitkd.data does, for predict.
SAMPLE_JSON="$("$PY" -c 'import json; from sklearn.datasets import load_digits
print(json.dumps((load_digits().images[5] / 16.0)[None].tolist()))')"
"$PY" -c 'import json, sys, numpy as np
np.save(sys.argv[1], np.asarray(json.loads(sys.argv[2]), dtype=np.float32))' "$OUT/sample.npy" "$SAMPLE_JSON"

# Point the installed edge.env at the loopback cloud, as step 4 of the docs has
# the owner do by hand.
configure() {
  local board="$1" serve_port="$2" metrics_port="$3" profile
  profile=raspberry-pi-4; [ "$board" = pi5 ] && profile=raspberry-pi-5
  sed -i -e "s#^SPLITKD_CLOUD=.*#SPLITKD_CLOUD=127.0.0.1:$GRPC_PORT#" \
    -e "s#^SPLITKD_CLOUD_HTTP=.*#SPLITKD_CLOUD_HTTP=$CLOUD_HTTP#" \
    -e "s#^SPLITKD_DEVICE_ID=.*#SPLITKD_DEVICE_ID=$board-check#" \
    -e "s#^SPLITKD_DEVICE_PROFILE=.*#SPLITKD_DEVICE_PROFILE=$profile#" \
    -e "s#^SPLITKD_LINK_PROFILE=.*#SPLITKD_LINK_PROFILE=ethernet#" \
    -e "s#^SPLITKD_HOST=.*#SPLITKD_HOST=127.0.0.1#" \
    -e "s#^SPLITKD_HTTP_PORT=.*#SPLITKD_HTTP_PORT=$serve_port#" \
    -e "s#^SPLITKD_METRICS_PORT=.*#SPLITKD_METRICS_PORT=$metrics_port#" \
    "$WORK/etc/splitkd/edge.env"
}

# The emulated CPU's LSE atomics, from the ELF auxiliary vector (AT_HWCAP bit
# 8, HWCAP_ATOMICS): the Pi 4's Cortex-A72 has none, the Pi 5's Cortex-A76
# has them; a wheel that uses them dies with SIGILL on the former.
has_atomics() {
  local hwcap
  hwcap="$(in_pi "$1" /usr/bin/env LD_SHOW_AUXV=1 /bin/true | awk '/^AT_HWCAP:/ { print $2 }')"
  if (((0x${hwcap#0x} >> 8) & 1)); then echo yes; else echo no; fi
}

# The install, timed; its venv size. $1 board, $2 stage, rest: install.sh options.
install_stage() {
  local board="$1" stage="$2" cpu t0 t1; shift 2
  cpu="$(cpu_of "$board")"
  say "$board ($cpu): deploy/raspberry-pi/install.sh $* (log $OUT/$board-$stage-install.log)"
  t0=$(date +%s.%N)
  if ! in_pi "$cpu" "${INSTALL_ENV[@]}" /bin/bash -c 'cd /root/splitkd && deploy/raspberry-pi/install.sh "$@"' \
    install.sh "$@" >"$OUT/$board-$stage-install.log" 2>&1; then
    tail -n 5 "$OUT/$board-$stage-install.log" | sed 's/^/    /'
    say "$board: the $stage install FAILED; see $OUT/$board-$stage-install.log"
    record "$board" "$stage" install_result "$(install_failure "$OUT/$board-$stage-install.log")"
    return 1
  fi
  record "$board" "$stage" install_result ok
  t1=$(date +%s.%N)
  record "$board" "$stage" install_seconds "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")"
  record "$board" "$stage" venv_mb "$(du -sm "$WORK/opt/splitkd" | cut -f1)"
  grep -E '^(onnxruntime|torch|splitkd-edge) ' "$OUT/$board-$stage-install.log" | sed 's/^/    smoke: /' || true
}
INSTALL_ENV=()
# The installer's own verdict, from its last line: which smoke test, which signal.
install_failure() {
  if grep -q "torch crashed with 'Illegal instruction'" "$1"; then echo "FAILED: torch SIGILL"
  elif grep -q "onnxruntime crashed with 'Illegal instruction'" "$1"; then echo "FAILED: onnxruntime SIGILL"
  else echo "FAILED"; fi
}

# systemd-analyze verify inside the chroot, where the units' ExecStart exists:
# the units the installer put in /etc/systemd/system, and the repository's
# others (the training unit after an inference-only install) from a scratch
# folder.
verify_units() {
  local board="$1" stage="$2" cpu units=() u out
  cpu="$(cpu_of "$board")"
  mkdir -p "$WORK/run/unit-check"
  for u in "$ROOT"/deploy/raspberry-pi/*.service; do
    if [ -e "$WORK/etc/systemd/system/${u##*/}" ]; then
      units+=("/etc/systemd/system/${u##*/}")
    else
      cp "$u" "$WORK/run/unit-check/"
      units+=("/run/unit-check/${u##*/}")
    fi
  done
  if out="$(in_pi "$cpu" systemd-analyze verify "${units[@]}" 2>&1)"; then
    record "$board" "$stage" units_verified "${#units[@]} ok"
  else
    record "$board" "$stage" units_verified "FAILED"
    echo "$out" | sed 's/^/    systemd-analyze: /'
  fi
  [ -z "$out" ] || echo "$out" >"$OUT/$board-$stage-systemd-analyze.txt"
  record "$board" "$stage" unit_enabled "$([ -L "$WORK/etc/systemd/system/multi-user.target.wants/splitkd-edge.service" ] && echo yes || echo no)"
}

# Peak resident memory (VmHWM, MB) of the emulated `splitkd-edge serve`: the
# python process in the cgroup. qemu runs it, so its /proc entry is qemu's,
# with the arm64 program's command line after qemu's (runuser and the shell
# that exec'd it mention "splitkd-edge serve" too: the largest one is python).
serve_vmhwm_mb() {
  local pid best=0 kb
  while read -r pid; do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'python3* .*splitkd-edge serve' || continue
    kb="$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)"
    [ -n "$kb" ] && [ "$kb" -gt "$best" ] && best="$kb"
  done <"$CGROUP/cgroup.procs"
  [ "$best" -gt 0 ] || return 1
  echo $((best / 1024))
}

# pull, then serve in a memory cgroup of 512 MB (no swap here), predict over
# HTTP and with the CLI. $1 board, $2 stage.
serve_stage() {
  local board="$1" stage="$2" cpu port model hwm status
  cpu="$(cpu_of "$board")"
  port="$(free_port)"
  configure "$board" "$port" "$(free_port)"
  model=student-native-0
  wait_for_student
  say "$board: splitkd-edge pull --model $model (as user splitkd, edge.env as the units read it)"
  as_splitkd "$cpu" "/opt/splitkd/bin/splitkd-edge pull --model $model --model-dir /var/lib/splitkd/models" \
    >"$OUT/$board-$stage-pull.log" 2>&1 || { cat "$OUT/$board-$stage-pull.log"; fail "$board: pull failed"; }
  CGROUP="/sys/fs/cgroup/memory/splitkd-pi-check-$board"
  mkdir -p "$CGROUP"
  echo $((MEMORY_LIMIT_MB * 1024 * 1024)) >"$CGROUP/memory.limit_in_bytes"
  [ -e "$CGROUP/memory.memsw.limit_in_bytes" ] &&
    echo $((MEMORY_LIMIT_MB * 1024 * 1024)) >"$CGROUP/memory.memsw.limit_in_bytes"
  say "$board: splitkd-edge serve in a ${MEMORY_LIMIT_MB} MB memory cgroup on 127.0.0.1:$port"
  (
    echo "$BASHPID" >"$CGROUP/cgroup.procs"
    as_splitkd "$cpu" "exec /opt/splitkd/bin/splitkd-edge serve" >"$OUT/$board-$stage-serve.log" 2>&1
  ) &
  PIDS+=("$!")
  local t0 t1
  t0=$(date +%s.%N)
  for _ in $(seq 300); do
    status="$(curl -fsS "http://127.0.0.1:$port/healthz" 2>/dev/null || true)"
    [[ "$status" == *'"status":"ok"'* ]] && break
    sleep 0.5
  done
  [[ "$status" == *'"status":"ok"'* ]] || { cat "$OUT/$board-$stage-serve.log"; fail "$board: serve did not come up with the model"; }
  t1=$(date +%s.%N)
  record "$board" "$stage" serve_ready_seconds "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")"
  "$PY" -m testbed.pi_report latency "http://127.0.0.1:$port/v1/predict" "$SAMPLE_JSON" "$PREDICTS" |
    while read -r key value; do record "$board" "$stage" "$key" "$value"; done
  # The same model and sample with onnxruntime natively: the emulated Pi must agree.
  record "$board" "$stage" native_class "$("$PY" -c 'import json, sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1])
x = np.asarray([json.loads(sys.argv[2])], dtype=np.float32)
print(int(s.run(None, {s.get_inputs()[0].name: x})[0].argmax()))' "$OUT/native/models/$model/1/model.onnx" "$SAMPLE_JSON")"
  cp "$OUT/sample.npy" "$WORK/var/lib/splitkd/sample.npy"
  t0=$(date +%s.%N)
  as_splitkd "$cpu" "/opt/splitkd/bin/splitkd-edge predict --input /var/lib/splitkd/sample.npy" \
    >"$OUT/$board-$stage-predict.log" 2>&1 || { cat "$OUT/$board-$stage-predict.log"; fail "$board: predict failed"; }
  t1=$(date +%s.%N)
  record "$board" "$stage" predict_cli_seconds "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")"
  hwm="$(serve_vmhwm_mb)" || fail "$board: serve is gone (killed by the ${MEMORY_LIMIT_MB} MB limit?)"
  record "$board" "$stage" serve_vmhwm_mb "$hwm"
  record "$board" "$stage" cgroup_peak_mb "$(awk '{ printf "%.0f", $1 / 1048576 }' "$CGROUP/memory.max_usage_in_bytes")"
  record "$board" "$stage" oom_kills "$(awk '/^oom_kill / { print $2 }' "$CGROUP/memory.oom_control")"
  record "$board" "$stage" memory_limit_mb "$MEMORY_LIMIT_MB"
}

# -------------------------------------------------------- 3. inference only --
for board in "${BOARDS[@]}"; do
  [ "$INFERENCE" -eq 1 ] || break
  prepare "$board" inference
  record "$board" inference cpu "$(cpu_of "$board")"
  record "$board" inference hwcap_atomics "$(has_atomics "$(cpu_of "$board")")"
  install_stage "$board" inference --inference-only || fail "$board: the inference-only install failed"
  verify_units "$board" inference
  serve_stage "$board" inference
  cleanup
done

# A short split-training run as the train unit runs it, its peak memory (the
# largest process's maxrss, from the host's time(1) around the chroot).
train_stage() {
  local board="$1" stage="$2" cpu t0 t1 maxrss accuracy
  cpu="$(cpu_of "$board")"
  configure "$board" "$(free_port)" "$(free_port)"
  say "$board: splitkd-edge train, $EPOCHS epochs against the cloud over loopback (log $OUT/$board-$stage-train.log)"
  WRAP=(/usr/bin/time -o "$OUT/$board-$stage-train.time" -f '%M')
  t0=$(date +%s.%N)
  if ! as_splitkd "$cpu" "/opt/splitkd/bin/splitkd-edge train --no-progress --no-plots --fresh --epochs $EPOCHS" \
    >"$OUT/$board-$stage-train.log" 2>&1; then
    WRAP=()
    tail -n 15 "$OUT/$board-$stage-train.log" | sed 's/^/    /'
    fail "$board: training failed; see $OUT/$board-$stage-train.log"
  fi
  t1=$(date +%s.%N)
  WRAP=()
  maxrss="$(tail -n 1 "$OUT/$board-$stage-train.time")"
  record "$board" "$stage" train_seconds "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")"
  record "$board" "$stage" train_vmhwm_mb "$(awk "BEGIN { printf \"%.0f\", $maxrss / 1024 }")"
  record "$board" "$stage" epochs "$EPOCHS"
  accuracy="$(grep -o 'accuracy [0-9.]*' "$OUT/$board-$stage-train.log" | tail -n 1 | cut -d' ' -f2)"
  record "$board" "$stage" train_accuracy "${accuracy:--}"
  tail -n 1 "$OUT/$board-$stage-train.log" | sed 's/^/    /'
}

# ------------------------------------------------------------- 4. training --
if [ "$TRAIN" -eq 1 ]; then
  if curl -fsS -m 20 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
    say "download.pytorch.org answers: the installer's CPU-index torch, as a Pi gets it"
  elif [ "$TORCH_FROM_REGISTRY" -eq 1 ]; then
    registry="$("$PY" -m pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)"
    say "download.pytorch.org is unreachable: --torch-from-registry installs torch from $registry,"
    say "  whose aarch64 torch is the CUDA build (~4.7 GB with its NVIDIA libraries): NOT what a Pi gets"
    INSTALL_ENV=(TORCH_INDEX_URL="$registry")
    EXTRA_NOTES+=("training install: download.pytorch.org unreachable, torch from the registry ($registry): its aarch64 build is the CUDA one, so the venv size is not a Pi's, and on the Pi 4 its NVPL BLAS dies with SIGILL (LSE atomics)")
  else
    fail "download.pytorch.org is unreachable from here: add --torch-from-registry (PI_CHECK_ARGS=--torch-from-registry) to install the registry's CUDA torch instead"
  fi
  for board in "${BOARDS[@]}"; do
    prepare "$board" train
    record "$board" train cpu "$(cpu_of "$board")"
    if install_stage "$board" train; then
      verify_units "$board" train
      train_stage "$board" train
    fi
    cleanup
  done
  INSTALL_ENV=()
else
  say "training install skipped (make pi-check PI_TRAIN=1 adds it: a ~4.7 GB venv here)"
fi

# ------------------------------------------------------------- 5. report --
NOTES=(
  "emulated with qemu-user $(/usr/bin/qemu-aarch64-static --version | head -n 1 | awk '{print $3}') on $(uname -m), $(nproc) host cores; fake /sys/devices/system/cpu with the board's MIDR_EL1 (an emulation artefact: oneDNN in torch reads it at import)"
  "memory: serve ran in a cgroup with memory.limit_in_bytes=${MEMORY_LIMIT_MB} MB and no swap; peak MB is VmHWM of the qemu process running it (qemu's translator included, so a real Pi's is lower)"
  "latency: $PREDICTS POST /v1/predict of one 8x8 digit from this host over loopback; install time includes apt-get and every download (each board starts from a fresh root file system)"
)
[ "${#EXTRA_NOTES[@]}" -gt 0 ] && NOTES+=("${EXTRA_NOTES[@]}")
args=()
for n in "${NOTES[@]}"; do args+=(--note "$n"); done
say "report: $OUT/report.md, $OUT/report.json"
"$PY" -m testbed.pi_report render "$OUT" "${args[@]}"
