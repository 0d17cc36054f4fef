#!/usr/bin/env bash
# CPU profiles behind docs/benchmarks.md "Bottlenecks" (issue 7).
#
#   scripts/bench_profile.sh throughput   perf on the real dispatcher under loadgen's flood
#   scripts/bench_profile.sh relay-200    perf on the dispatcher under 200 relay sessions
#   scripts/bench_profile.sh python       py-spy on the commander / raw grpc.aio writers
#                                         (scenario 6) and the FastAPI server (scenario 7)
#
# The dispatcher has no pprof endpoint; Go keeps frame pointers, so
# `perf record -g -p PID` sees its goroutine stacks. scripts/bench_profile.py
# groups the samples by goroutine root and by component. loadgen writes its
# own pprof profile (--cpuprofile) beside, to show it is not the limit.
# Output: .run/profile/ (BENCH_OUT to change). Needs perf (linux-tools) for the
# Go profiles and .venv/bin/py-spy for the Python ones.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${BENCH_OUT:-$ROOT/.run/profile}
WHAT=${1:-throughput}
mkdir -p "$OUT" bin
(cd dispatcher_go && go build -trimpath -o ../bin/dispatcher ./cmd/dispatcher && go build -trimpath -o ../bin/loadgen ./cmd/loadgen)

DPID=
cleanup() { if [ -n "$DPID" ]; then kill "$DPID" 2>/dev/null || true; wait "$DPID" 2>/dev/null || true; fi; }
trap cleanup EXIT

start_dispatcher() {
  rm -rf "$OUT/data" "$OUT/addr"
  bin/dispatcher --listen 127.0.0.1:0 --addr-file "$OUT/addr" --data-dir "$OUT/data" \
    --queue-size 100000 --commander-token ct --client-token kt --log-level warn "$@" >"$OUT/dispatcher.log" 2>&1 &
  DPID=$!
  for _ in $(seq 1 100); do [ -s "$OUT/addr" ] && break; sleep 0.1; done
  [ -s "$OUT/addr" ] || { echo "dispatcher did not start" >&2; exit 1; }
}

perf_scenario() {
  if ! command -v perf >/dev/null && [ "$(id -u)" = 0 ]; then
    # Debian's linux-perf; the project installs what it needs itself.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-perf >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-perf >/dev/null; }
  fi
  command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }
  start_dispatcher
  bin/loadgen --addr "$(cat "$OUT/addr")" --token ct --client-token kt --dispatcher-pid "$DPID" \
    --duration 16s --cpuprofile "$OUT/loadgen-$WHAT.prof" "$@" >"$OUT/loadgen-$WHAT.txt" 2>&1 &
  local lg=$!
  sleep 3 # past the warm-up
  perf record -F 499 -g -p "$DPID" -o "$OUT/perf-$WHAT.data" -- sleep 10 >/dev/null 2>&1
  wait "$lg" || true
  cat "$OUT/loadgen-$WHAT.txt"
  perf script -i "$OUT/perf-$WHAT.data" -F comm,tid,ip,sym 2>/dev/null >"$OUT/perf-$WHAT.txt"
  echo "== dispatcher CPU profile ($WHAT): perf record -F 499 -g -p <dispatcher> for 10 s"
  .venv/bin/python scripts/bench_profile.py perf "$OUT/perf-$WHAT.txt"
  echo "== loadgen's own profile: go tool pprof -top bin/loadgen $OUT/loadgen-$WHAT.prof"
  (cd dispatcher_go && go tool pprof -top -nodecount=8 ../bin/loadgen "$OUT/loadgen-$WHAT.prof" 2>/dev/null | sed -n '4,16p')
}

case $WHAT in
  throughput) perf_scenario --scenario throughput --sessions 8 --packet-bytes 64 --streams-per-conn 2 ;;
  relay-200) perf_scenario --scenario relay --sessions 200 --rate 20 --packet-bytes 32 ;;
  python)
    [ -x .venv/bin/py-spy ] || { echo "needs .venv/bin/pip install py-spy" >&2; exit 1; }
    start_dispatcher
    export DISPATCHER_ADDR DISPATCHER_PID=$DPID DISPATCHER_COMMANDER_TOKEN=ct DISPATCHER_CLIENT_TOKEN=kt BENCH_QUICK=1
    DISPATCHER_ADDR=$(cat "$OUT/addr")
    BENCH_PYSPY=$OUT .venv/bin/python scripts/bench_pyceiling.py
    BENCH_PYSPY=$OUT .venv/bin/python scripts/bench_rest.py
    for name in raw commander rest-server; do
      echo "== py-spy: $name ($OUT/pyspy-$name.txt)"
      .venv/bin/python scripts/bench_profile.py pyspy "$OUT/pyspy-$name.txt"
    done
    ;;
  *) echo "usage: $0 throughput|relay-200|python" >&2; exit 2 ;;
esac
