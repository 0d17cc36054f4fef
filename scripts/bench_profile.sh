#!/usr/bin/env bash
# Profiles behind docs/benchmarks.md "Bottlenecks" (issue 7).
#
#   scripts/bench_profile.sh throughput   perf on the real dispatcher under loadgen's flood
#   scripts/bench_profile.sh throughput-memory   the same with --storage-backend memory
#   scripts/bench_profile.sh relay-200    perf on the dispatcher under 200 relay sessions
#   scripts/bench_profile.sh stop         pprof CPU: 50 sessions × 50 pkt/s, each cancelled
#   scripts/bench_profile.sh stop-flood   pprof CPU + goroutine samples + the stop's legs:
#                                         8 flooding sessions, each cancelled
#   scripts/bench_profile.sh idle         pprof heap + goroutines: 10 000 idle slots
#   scripts/bench_profile.sh tools        pprof CPU: 50 sessions × 20 tool calls/s
#   scripts/bench_profile.sh policy       pprof CPU: policy-200 (200 × 20 pkt/s, 10 rules)
#   scripts/bench_profile.sh python       py-spy on the commander / raw grpc.aio writers
#                                         (scenario 6) and the FastAPI server (scenario 7)
#
# The loadgen arguments are those of scripts/bench.sh's full mode (shorter
# runs). perf: Go keeps frame pointers, so `perf record -g -p PID` sees the
# goroutine stacks. pprof: the dispatcher runs with --pprof-listen
# 127.0.0.1:0 (the port is read from its log) and /debug/pprof/profile,
# /heap and /goroutine are fetched while loadgen runs. scripts/bench_profile.py
# groups samples by component. loadgen writes its own pprof profile
# (--cpuprofile) beside, to show it is not the limit.
# Output: .run/profile/ (BENCH_OUT to change). Needs perf (linux-tools) for the
# perf profiles, curl and go for the pprof ones, .venv/bin/py-spy for Python.
# BENCH_DISPATCHER=PATH profiles another dispatcher binary (e.g. a patched one).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(realpath -m "${BENCH_OUT:-$ROOT/.run/profile}")
WHAT=${1:-throughput}
mkdir -p "$OUT" bin
(cd dispatcher_go && go build -trimpath -o ../bin/dispatcher ./cmd/dispatcher && go build -trimpath -o ../bin/loadgen ./cmd/loadgen)
DISPATCHER=$(realpath "${BENCH_DISPATCHER:-bin/dispatcher}")
PY=.venv/bin/python

DPID=
LGPID=
cleanup() {
  local p
  for p in $LGPID $DPID; do
    if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; fi
  done
}
trap cleanup EXIT

# start_dispatcher ARGS...: a fresh dispatcher on 127.0.0.1:0 with pprof on
# another OS-chosen loopback port; sets DPID, ADDR and PPROF.
start_dispatcher() {
  rm -rf "$OUT/data" "$OUT/addr"
  "$DISPATCHER" --listen 127.0.0.1:0 --addr-file "$OUT/addr" --data-dir "$OUT/data" \
    --queue-size 100000 --commander-token ct --client-token kt --http-listen "" \
    --pprof-listen 127.0.0.1:0 --log-level info "$@" >"$OUT/dispatcher-$WHAT.log" 2>&1 &
  DPID=$!
  for _ in $(seq 1 100); do [ -s "$OUT/addr" ] && break; sleep 0.1; done
  [ -s "$OUT/addr" ] || { echo "dispatcher did not start" >&2; exit 1; }
  ADDR=$(head -n 1 "$OUT/addr")
  PPROF=$(sed -n 's/.*"msg":"pprof serving","addr":"\([^"]*\)".*/\1/p' "$OUT/dispatcher-$WHAT.log" | head -n 1)
  [ -n "$PPROF" ] || { echo "no pprof address in the dispatcher log" >&2; exit 1; }
}

stop_dispatcher() {
  kill "$DPID" 2>/dev/null || true
  wait "$DPID" 2>/dev/null || true
  DPID=
}

# start_loadgen DURATION ARGS...: loadgen in the background (LGPID).
start_loadgen() {
  local dur=$1; shift
  bin/loadgen --addr "$ADDR" --token ct --client-token kt --dispatcher-pid "$DPID" \
    --duration "$dur" --cpuprofile "$OUT/loadgen-$WHAT.prof" "$@" >"$OUT/loadgen-$WHAT.txt" 2>&1 &
  LGPID=$!
}

wait_loadgen() {
  wait "$LGPID" || echo "(loadgen exited $?: a check failed, see above)"
  LGPID=
  cat "$OUT/loadgen-$WHAT.txt"
}

pprof_top() { # FILE [pprof flags...]
  local f=$1; shift
  (cd dispatcher_go && go tool pprof -top "$@" "$DISPATCHER" "$f" 2>/dev/null)
}

loadgen_profile() {
  echo "== loadgen's own profile: go tool pprof -top bin/loadgen $OUT/loadgen-$WHAT.prof"
  (cd dispatcher_go && go tool pprof -top -nodecount=6 ../bin/loadgen "$OUT/loadgen-$WHAT.prof" 2>/dev/null | sed -n '4,12p')
}

# perf_scenario [--dispatcher ARG]... LOADGEN-ARGS...: perf on the dispatcher
# (started with the --dispatcher arguments) under loadgen's load.
perf_scenario() {
  local dargs=()
  while [ "${1:-}" = --dispatcher ]; do dargs+=("$2"); shift 2; done
  if ! command -v perf >/dev/null && [ "$(id -u)" = 0 ]; then
    # Debian's linux-perf; the project installs what it needs itself.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-perf >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-perf >/dev/null; }
  fi
  command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }
  start_dispatcher ${dargs[@]+"${dargs[@]}"}
  start_loadgen 16s "$@"
  sleep 3 # past the warm-up
  perf record -F 499 -g -p "$DPID" -o "$OUT/perf-$WHAT.data" -- sleep 10 >/dev/null 2>&1
  wait_loadgen
  perf script -i "$OUT/perf-$WHAT.data" -F comm,tid,ip,sym 2>/dev/null >"$OUT/perf-$WHAT.txt"
  echo "== dispatcher CPU profile ($WHAT): perf record -F 499 -g -p <dispatcher> for 10 s"
  $PY scripts/bench_profile.py perf "$OUT/perf-$WHAT.txt"
  loadgen_profile
}

# cpu_scenario DURATION LOADGEN-ARGS...: a pprof CPU profile of the dispatcher
# (3 s into the run, for DURATION-5 s) plus goroutine snapshots every 0.5 s.
cpu_scenario() {
  local dur=$1; shift
  local secs=$((${dur%s} - 5)) i
  start_loadgen "$dur" "$@"
  sleep 3 # past the start and the warm-up
  curl -fsS "http://$PPROF/debug/pprof/profile?seconds=$secs" -o "$OUT/cpu-$WHAT.pprof" &
  local cpu=$!
  rm -f "$OUT"/goroutines-"$WHAT".*.txt
  for i in $(seq 1 $((secs * 2 - 1))); do
    curl -fsS "http://$PPROF/debug/pprof/goroutine?debug=1" -o "$OUT/goroutines-$WHAT.$i.txt" || true
    sleep 0.5
  done
  wait "$cpu"
  wait_loadgen
  echo "== dispatcher CPU profile ($WHAT): GET /debug/pprof/profile?seconds=$secs, $OUT/cpu-$WHAT.pprof"
  (cd dispatcher_go && go tool pprof -traces "$DISPATCHER" "$OUT/cpu-$WHAT.pprof" 2>/dev/null) >"$OUT/cpu-$WHAT.traces"
  $PY scripts/bench_profile.py traces "$OUT/cpu-$WHAT.traces"
  echo "-- go tool pprof -top (flat, first 15)"
  pprof_top "$OUT/cpu-$WHAT.pprof" -nodecount=15 | sed -n '4,20p'
  echo "== goroutine snapshots ($((secs * 2 - 1)) × GET /debug/pprof/goroutine?debug=1, every 0.5 s)"
  $PY scripts/bench_profile.py goroutines "$OUT"/goroutines-"$WHAT".*.txt
  loadgen_profile
}

case $WHAT in
  throughput) perf_scenario --scenario throughput --sessions 8 --packet-bytes 64 --streams-per-conn 2 ;;
  throughput-memory)
    perf_scenario --dispatcher --storage-backend --dispatcher memory \
      --scenario throughput --sessions 8 --packet-bytes 64 --streams-per-conn 2
    ;;
  relay-200) perf_scenario --scenario relay --sessions 200 --rate 20 --packet-bytes 32 ;;
  stop)
    start_dispatcher
    cpu_scenario 15s --scenario stop --sessions 50 --rate 50 --packet-bytes 16
    stop_dispatcher
    echo "== the dispatcher's own stop timings (its log, \"stop latency\")"
    $PY scripts/bench_profile.py stoplog "$OUT/dispatcher-$WHAT.log"
    ;;
  stop-flood)
    start_dispatcher
    cpu_scenario 15s --scenario stop --sessions 8 --rate 0 --packet-bytes 64 --stop-min 100ms --stop-max 400ms
    stop_dispatcher
    echo "== the dispatcher's own stop timings (its log, \"stop latency\")"
    $PY scripts/bench_profile.py stoplog "$OUT/dispatcher-$WHAT.log"
    ;;
  tools)
    start_dispatcher
    cpu_scenario 15s --scenario tools --sessions 50 --rate 20
    ;;
  policy)
    bash scripts/bench.sh --write-policy "$OUT/bench-policy.yaml"
    start_dispatcher --policy-file "$OUT/bench-policy.yaml"
    cpu_scenario 15s --scenario policy --phrase "launch codes" --policy-rule bench-phrase \
      --sessions 200 --rate 20 --packet-bytes 16
    ;;
  idle)
    # 10 000 slots held 15 s; heap and goroutines once they are all open.
    start_dispatcher
    curl -fsS "http://$PPROF/debug/pprof/heap?debug=1" | sed -n '/^# runtime.MemStats/,$p' >"$OUT/memstats-idle-before.txt"
    start_loadgen 15s --scenario idle --sessions 10000 --streams-per-conn 100
    sleep 9 # the slots open at ~7 000/s; then settled
    curl -fsS "http://$PPROF/debug/pprof/heap?gc=1" -o "$OUT/heap-idle.pprof"
    curl -fsS "http://$PPROF/debug/pprof/heap?debug=1" | sed -n '/^# runtime.MemStats/,$p' >"$OUT/memstats-idle.txt"
    curl -fsS "http://$PPROF/debug/pprof/goroutine?debug=1" -o "$OUT/goroutines-idle.1.txt"
    grep -E '^VmRSS' "/proc/$DPID/status" >"$OUT/rss-idle.txt"
    wait_loadgen
    echo "== dispatcher memory with 10 000 idle slots ($OUT/heap-idle.pprof, memstats-idle.txt)"
    $PY scripts/bench_profile.py memstats "$OUT/memstats-idle-before.txt" "$OUT/memstats-idle.txt" "$OUT/rss-idle.txt" 10000
    echo "-- live heap by allocation site (go tool pprof -sample_index=inuse_space -top, first 15)"
    pprof_top "$OUT/heap-idle.pprof" -sample_index=inuse_space -nodecount=15 | sed -n '4,21p'
    echo "-- live heap by component (cumulative, from the same profile)"
    (cd dispatcher_go && go tool pprof -traces -sample_index=inuse_space "$DISPATCHER" "$OUT/heap-idle.pprof" 2>/dev/null) >"$OUT/heap-idle.traces"
    $PY scripts/bench_profile.py traces "$OUT/heap-idle.traces"
    echo "== goroutines with 10 000 idle slots"
    $PY scripts/bench_profile.py goroutines "$OUT/goroutines-idle.1.txt"
    ;;
  python)
    [ -x .venv/bin/py-spy ] || { echo "needs .venv/bin/pip install py-spy" >&2; exit 1; }
    start_dispatcher
    export DISPATCHER_ADDR DISPATCHER_PID=$DPID DISPATCHER_COMMANDER_TOKEN=ct DISPATCHER_CLIENT_TOKEN=kt BENCH_QUICK=1
    DISPATCHER_ADDR=$ADDR
    BENCH_PYSPY=$OUT $PY scripts/bench_pyceiling.py
    BENCH_PYSPY=$OUT $PY scripts/bench_rest.py
    for name in raw commander rest-server; do
      echo "== py-spy: $name ($OUT/pyspy-$name.txt)"
      $PY scripts/bench_profile.py pyspy "$OUT/pyspy-$name.txt"
    done
    ;;
  *) echo "usage: $0 throughput|throughput-memory|relay-200|stop|stop-flood|idle|tools|policy|python" >&2; exit 2 ;;
esac
