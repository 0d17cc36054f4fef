#!/usr/bin/env bash
# Benchmarks of the dispatcher (issue 7): builds the binaries, then runs each
# scenario of bin/loadgen against a fresh dispatcher process on 127.0.0.1:0
# and prints one table of the results.
#
#   scripts/bench.sh                 the stated loads, under 10 minutes on 2 cores
#   BENCH_QUICK=1 scripts/bench.sh   much smaller loads, under 2 minutes
#   scripts/bench.sh --write-policy FILE   only write the policy scenario's policy file
#
# Environment:
#   BENCH_OUT             where results go (default .run/bench): results.jsonl
#                         (one JSON line per scenario run, `loadgen report`
#                         reads it), <scenario>.txt (human summary), *.log
#   BENCH_ONLY            run only the scenario runs whose label contains this
#                         word (e.g. BENCH_ONLY=stop)
#   BENCH_DISPATCHER_ARGS extra flags for every dispatcher (e.g. a store)
#   BENCH_DISPATCHER      a dispatcher binary to measure instead of building
#                         bin/dispatcher (e.g. to compare two builds)
#   BENCH_PRIO            a command prefix for the dispatcher and loadgen of
#                         loadgen's scenarios, e.g. "chrt -r 1" (root): on a
#                         machine shared with other work it keeps their run-queue
#                         waits out of the latencies, for A/B pairs. Not a quiet
#                         machine: a CPU-bound goroutine (the GC's idle mark
#                         workers, a spinning thread) then holds its CPU against
#                         the other process for up to the round-robin slice, so
#                         GC pauses weigh more; compare runs made the same way.
#   BENCH_PYSPY           a directory: the Python drivers of scenarios 6 and 7
#                         also record py-spy profiles there (collapsed stacks)
#
# Besides loadgen's scenarios: scripts/bench_commander.py (stop/relay with the
# real commander), scripts/bench_pystopflood.py (stop-flood with the real
# commander), scripts/bench_pyceiling.py (issue 7 scenario 6: one
# commander process vs raw grpc.aio), scripts/bench_rest.py (scenario 7:
# FastAPI+SSE vs WatchTask). Profiles: scripts/bench_profile.sh.
# Results and what they mean: docs/benchmarks.md.
#
# Each scenario gets its own dispatcher, so one scenario's memory and event
# log do not skew the next. loadgen runs as a separate process on the same
# 2 cores as the dispatcher: the numbers include that contention.
# Exit status: 0 if every scenario ran and passed its checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- policy (issue 3) ---------------------------------------------------------
# The policy file of the policy scenario: the phrase rule loadgen's poisoned
# sessions trip (split across two packets), plus ten CEL rules that every
# packet is evaluated against and that never fire on the bench traffic, so
# the stop latency is measured with a realistic policy loaded.
write_bench_policy() {
  local f=$1 i
  {
    echo "version: 1"
    echo "limits: {max_tool_calls_per_minute: 1000000}"
    echo "rules:"
    echo "  - {id: bench-phrase, phrases: [\"launch codes\"], action: stop, reason: forbidden phrase}"
    for i in 1 2 3; do
      echo "  - {id: deny-$i, when: 'tool_name == \"shell$i\" && tool_args.cmd.contains(\"rm\")', action: deny}"
      echo "  - {id: word-$i, when: 'kind == \"content\" && window.contains(\"secret-word-$i\")', action: stop}"
      echo "  - {id: tenant-$i, when: 'cost > 1000.0 || labels[\"tenant$i\"] == \"blocked\"', action: stop, on_error: ignore}"
    done
    echo "tests:"
    echo "  - name: split phrase"
    echo "    packets: [{kind: content, text: \"xx launch\"}, {kind: content, text: \" codes xx\"}]"
    echo "    expect: {action: stop, rule: bench-phrase}"
  } >"$f"
}

# `scripts/bench.sh --write-policy FILE` only writes that policy file (for
# scripts/bench_profile.sh policy) and exits.
if [ "${1:-}" = --write-policy ] && [ -n "${2:-}" ]; then
  write_bench_policy "$2"
  exit 0
fi

ROOT=$PWD
# The commander and the bench scripts of this tree, whatever tree the venv's
# editable install points at (worktrees share one venv).
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
BIN=$ROOT/bin
OUT=${BENCH_OUT:-$ROOT/.run/bench}
QUICK=${BENCH_QUICK:-0}
ONLY=${BENCH_ONLY:-}
DISPATCHER=${BENCH_DISPATCHER:-$BIN/dispatcher}
read -r -a DISPATCHER_ARGS <<<"${BENCH_DISPATCHER_ARGS:-}"
read -r -a PRIO <<<"${BENCH_PRIO:-}"
COMMANDER_TOKEN=bench-commander-$$
CLIENT_TOKEN=bench-client-$$

mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
FAILED=()
PIDS=()
# Extra dispatcher flags of the scenario being run (e.g. --policy-file).
SCENARIO_DISPATCHER_ARGS=()

log() { printf '\033[2m[bench]\033[0m %s\n' "$*" >&2; }

# stop_pid PID: TERM, then KILL after 5 s.
stop_pid() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_file PATH SECONDS PID NAME: wait until PATH is non-empty.
wait_file() {
  local path=$1 secs=$2 pid=$3 name=$4 deadline=$((SECONDS + $2))
  until [ -s "$path" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited; last lines of its log:"; tail -n 20 "$OUT/$name.log" >&2; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      log "$name did not write $path within ${secs}s"; tail -n 20 "$OUT/$name.log" >&2; return 1
    fi
    sleep 0.1
  done
}

# start_dispatcher NAME: a fresh dispatcher on a free loopback port; sets
# DISPATCHER_PID and DISPATCHER_ADDR.
start_dispatcher() {
  local name=$1
  rm -f "$OUT/$name.addr"
  rm -rf "$OUT/$name.data" # each scenario starts from an empty store
  ${PRIO[@]+"${PRIO[@]}"} "$DISPATCHER" --listen 127.0.0.1:0 --addr-file "$OUT/$name.addr" --data-dir "$OUT/$name.data" \
    --commander-token "$COMMANDER_TOKEN" --client-token "$CLIENT_TOKEN" \
    --queue-size 100000 "${DISPATCHER_ARGS[@]}" "${SCENARIO_DISPATCHER_ARGS[@]}" >"$OUT/$name.log" 2>&1 &
  DISPATCHER_PID=$!
  PIDS+=("$DISPATCHER_PID")
  wait_file "$OUT/$name.addr" 30 "$DISPATCHER_PID" "$name"
  DISPATCHER_ADDR=$(head -n 1 "$OUT/$name.addr")
}

# scenario LABEL LOADGEN-ARGS...: run one loadgen scenario against its own
# dispatcher; the JSON result line is appended to results.jsonl.
scenario() {
  local label=$1; shift
  if [ -n "$ONLY" ] && [[ $label != *"$ONLY"* ]]; then return 0; fi
  log "scenario $label: loadgen $*"
  if ! start_dispatcher "dispatcher-$label"; then
    FAILED+=("$label (dispatcher did not start)"); return 0
  fi
  if ! ${PRIO[@]+"${PRIO[@]}"} "$BIN/loadgen" --addr "$DISPATCHER_ADDR" --token "$COMMANDER_TOKEN" --client-token "$CLIENT_TOKEN" \
    --dispatcher-pid "$DISPATCHER_PID" --label "$label" --json "$@" >>"$RESULTS" 2> >(tee "$OUT/$label.txt" >&2); then
    FAILED+=("$label")
  fi
  if ! kill -0 "$DISPATCHER_PID" 2>/dev/null; then
    FAILED+=("$label (the dispatcher died; see $OUT/dispatcher-$label.log)")
  fi
  stop_pid "$DISPATCHER_PID"
}

# --- hook: the Python commander stop benchmark ---------------------------
# Issue 7 scenario 1 with the real commander: stops fired at random moments
# while real commander slots stream from scriptedllm; the stop latency
# (dispatcher decision → stopped ack) and the model-stream close seen by
# scriptedllm's /stats. The driver is scripts/bench_commander.py.
# Contract: it is run as
#   .venv/bin/python scripts/bench_commander.py
# with DISPATCHER_ADDR, DISPATCHER_COMMANDER_TOKEN, DISPATCHER_CLIENT_TOKEN,
# SCRIPTED_LLM_URL (http://HOST:PORT/v1, /stats beside it), BENCH_QUICK set,
# a dispatcher and scriptedllm already running, and it appends result lines
# in loadgen's --json shape to $BENCH_RESULTS so that the table includes them.
python_commander_stop() {
  local label=python-commander-stop
  if [ -n "$ONLY" ] && [[ $label != *"$ONLY"* ]]; then return 0; fi
  if [ ! -f "$ROOT/scripts/bench_commander.py" ] || [ ! -x "$ROOT/.venv/bin/python" ]; then
    log "scenario $label: skipped (scripts/bench_commander.py not there yet)"
    return 0
  fi
  log "scenario $label"
  local tokens=2000 rate=50
  [ "$QUICK" = 1 ] && tokens=400
  rm -f "$OUT/scriptedllm.addr"
  "$BIN/scriptedllm" --listen 127.0.0.1:0 --addr-file "$OUT/scriptedllm.addr" \
    --tokens-per-sec "$rate" --tokens "$tokens" --reasoning-tokens 20 >"$OUT/scriptedllm.log" 2>&1 &
  local llm_pid=$!
  PIDS+=("$llm_pid")
  wait_file "$OUT/scriptedllm.addr" 10 "$llm_pid" scriptedllm || { FAILED+=("$label (scriptedllm)"); return 0; }
  start_dispatcher "dispatcher-$label" || { FAILED+=("$label (dispatcher)"); stop_pid "$llm_pid"; return 0; }
  # BENCH_FLEET_DISPATCHER: the fleet driver's replicas run the binary under
  # test too (it defaulted to bin/dispatcher, which BENCH_DISPATCHER skips building).
  if ! BENCH_FLEET_DISPATCHER=${BENCH_FLEET_DISPATCHER:-$DISPATCHER} \
    DISPATCHER_ADDR=$DISPATCHER_ADDR DISPATCHER_COMMANDER_TOKEN=$COMMANDER_TOKEN \
    DISPATCHER_CLIENT_TOKEN=$CLIENT_TOKEN DISPATCHER_PID=$DISPATCHER_PID \
    SCRIPTED_LLM_URL="http://$(head -n 1 "$OUT/scriptedllm.addr")/v1" BENCH_QUICK=$QUICK \
    BENCH_RESULTS=$RESULTS "$ROOT/.venv/bin/python" "$ROOT/scripts/bench_commander.py" \
    2> >(tee "$OUT/$label.txt" >&2); then
    FAILED+=("$label")
  fi
  stop_pid "$DISPATCHER_PID"
  stop_pid "$llm_pid"
}

# python_driver LABEL SCRIPT: a Python driver against its own fresh
# dispatcher (no scriptedllm); the script appends its result lines to
# $BENCH_RESULTS. BENCH_PYSPY=DIR also records py-spy profiles there.
python_driver() {
  local label=$1 script=$2
  if [ -n "$ONLY" ] && [[ $label != *"$ONLY"* ]]; then return 0; fi
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    log "scenario $label: skipped (no .venv)"; return 0
  fi
  log "scenario $label: .venv/bin/python scripts/$script"
  start_dispatcher "dispatcher-$label" || { FAILED+=("$label (dispatcher)"); return 0; }
  # BENCH_FLEET_DISPATCHER: the fleet driver's replicas run the binary under
  # test too (it defaulted to bin/dispatcher, which BENCH_DISPATCHER skips building).
  if ! BENCH_FLEET_DISPATCHER=${BENCH_FLEET_DISPATCHER:-$DISPATCHER} \
    DISPATCHER_ADDR=$DISPATCHER_ADDR DISPATCHER_COMMANDER_TOKEN=$COMMANDER_TOKEN \
    DISPATCHER_CLIENT_TOKEN=$CLIENT_TOKEN DISPATCHER_PID=$DISPATCHER_PID BENCH_QUICK=$QUICK \
    BENCH_RESULTS=$RESULTS "$ROOT/.venv/bin/python" "$ROOT/scripts/$script" \
    2> >(tee "$OUT/$label.txt" >&2); then
    FAILED+=("$label")
  fi
  if ! kill -0 "$DISPATCHER_PID" 2>/dev/null; then
    FAILED+=("$label (the dispatcher died; see $OUT/dispatcher-$label.log)")
  fi
  stop_pid "$DISPATCHER_PID"
}

# policy_scenario LABEL LOADGEN-ARGS...: the policy scenario against a
# dispatcher started with the bench policy file.
policy_scenario() {
  local label=$1; shift
  write_bench_policy "$OUT/bench-policy.yaml"
  SCENARIO_DISPATCHER_ARGS=(--policy-file "$OUT/bench-policy.yaml")
  scenario "$label" --scenario policy --phrase "launch codes" --policy-rule bench-phrase "$@"
  SCENARIO_DISPATCHER_ARGS=()
}

# policy_eval: the cost of evaluating one packet against 1, 10 and 100 CEL
# rules (BenchmarkEvaluate in internal/policy); the ns/op lines are kept in
# policy-eval.txt and added to results.jsonl as a pseudo-scenario.
policy_eval() {
  local label=policy-eval
  if [ -n "$ONLY" ] && [[ $label != *"$ONLY"* ]]; then return 0; fi
  log "policy evaluation cost: go test -run '^\$' -bench BenchmarkEvaluate -benchtime 1s ./internal/policy/"
  if ! (cd dispatcher_go && go test -run '^$' -bench BenchmarkEvaluate -benchtime 1s ./internal/policy/) \
    >"$OUT/policy-eval.log" 2>&1; then
    tail -n 20 "$OUT/policy-eval.log" >&2
    FAILED+=("$label"); return 0
  fi
  grep -E '^BenchmarkEvaluate/.*/rules=(1|10|100)-' "$OUT/policy-eval.log" >"$OUT/policy-eval.txt" || true
  if [ ! -s "$OUT/policy-eval.txt" ]; then
    FAILED+=("$label (no BenchmarkEvaluate lines)"); return 0
  fi
  cat "$OUT/policy-eval.txt" >&2
  awk -v label="$label" '
    { split($1, parts, "/"); kind = parts[2]; rules = parts[3]; sub(/-[0-9]+$/, "", rules); sub(/rules=/, "", rules)
      for (i = 2; i < NF; i++) if ($(i + 1) == "ns/op") ns = $i
      vals = vals sep sprintf("{\"name\":\"evaluate one %s packet, %s rules\",\"value\":%s,\"unit\":\"ns/op\"}", kind, rules, ns)
      sep = "," }
    END { printf("{\"scenario\":\"policy-eval\",\"label\":\"%s\",\"params\":{\"benchtime\":\"1s\"},\"values\":[%s],\"ok\":true}\n", label, vals) }
  ' "$OUT/policy-eval.txt" >>"$RESULTS"
}

# memory_scenario LABEL LOADGEN-ARGS...: a scenario against a dispatcher
# with --storage-backend memory, to show what the default SQLite store adds
# (a watcher sees an event only once it is written: up to
# --event-flush-interval plus the write).
memory_scenario() {
  local label=$1; shift
  SCENARIO_DISPATCHER_ARGS=(--storage-backend memory)
  scenario "$label" "$@"
  SCENARIO_DISPATCHER_ARGS=()
}

# --- build -----------------------------------------------------------------
log "building into $BIN"
mkdir -p "$BIN"
CMDS="loadgen scriptedllm dispatchctl"
[ -n "${BENCH_DISPATCHER:-}" ] || CMDS="dispatcher $CMDS"
(cd dispatcher_go && for c in $CMDS; do
  go build -trimpath -o "$BIN/$c" "./cmd/$c"
done)

log "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(go version | cut -d' ' -f3), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
START=$SECONDS

# --- the loads ---------------------------------------------------------------
# stop:       N sessions streaming token-sized packets; each task cancelled
#             0.2–2 s after its first content; lanes resubmit until the end.
#             stop-flood: the same while every session floods, each commander
#             keeping at most 64 content packets unacknowledged (--credit;
#             with --credit 0 the stopped queues behind a full HTTP/2 window).
# relay:      N sessions at a steady rate, one watcher each; each session's
#             emits are a Poisson process of its own (like tools).
#             *-memory: the same against --storage-backend memory (no store
#             on the path). *-burst: every session on one grid (--arrivals
#             burst, the pacing before: all N emit in the same millisecond;
#             the worst case).
# throughput: N sessions flooding 64-byte packets over N/2 connections, one
#             watcher each; throughput-memory: the same against
#             --storage-backend memory; throughput-ingest: the same with no
#             watcher.
# idle:       N idle slots (hello, KeepAlive 10 s) held open; RSS per slot.
# tools:      N sessions each calling a tool 20 times a second, alternating
#             the built-in echo and bench_echo served by loadgen as a provider;
#             each session's calls are a Poisson process of its own (real
#             commanders are not phase-locked). tools-burst: the same with
#             every session on one 50 ms grid (--arrivals burst, the pacing
#             before: ~50 calls in the same millisecond). bench_echo is
#             declared idempotent (it only echoes), so it is invoked at once;
#             tools-durable: the same, Poisson, with bench_echo declared not
#             idempotent, so each provider call waits until its tool_call
#             event is durable (what a tool that acts on the world pays).
# policy:     N sessions streaming 50 packets/s against a dispatcher with a
#             policy file (a phrase rule + 9 CEL rules); half the tasks emit
#             the forbidden phrase split across two packets 0.2–2 s in:
#             completing packet sent → stop at the commander → stopped
#             recorded, and nothing after the stop reaches a watcher.
if [ "$QUICK" = 1 ]; then
  log "BENCH_QUICK=1: small loads"
  scenario stop       --scenario stop --sessions 10 --duration 6s --rate 50 --packet-bytes 16
  scenario stop-flood --scenario stop --sessions 4 --duration 4s --rate 0 --packet-bytes 64 --stop-min 100ms --stop-max 400ms --credit 64
  scenario relay      --scenario relay --sessions 20 --duration 6s --rate 50 --packet-bytes 32
  memory_scenario relay-memory --scenario relay --sessions 20 --duration 6s --rate 50 --packet-bytes 32
  scenario throughput --scenario throughput --sessions 4 --duration 6s --packet-bytes 64 --streams-per-conn 2
  memory_scenario throughput-memory --scenario throughput --sessions 4 --duration 6s --packet-bytes 64 --streams-per-conn 2
  scenario idle       --scenario idle --sessions 500 --duration 3s --streams-per-conn 50
  scenario tools      --scenario tools --sessions 10 --duration 5s --rate 20
  policy_scenario policy --sessions 10 --duration 5s --rate 50 --packet-bytes 16 --stop-min 100ms --stop-max 1s
else
  scenario stop        --scenario stop --sessions 50 --duration 30s --rate 50 --packet-bytes 16
  scenario stop-flood  --scenario stop --sessions 8 --duration 15s --rate 0 --packet-bytes 64 --stop-min 100ms --stop-max 400ms --credit 64
  scenario relay-64    --scenario relay --sessions 64 --duration 20s --rate 50 --packet-bytes 32
  scenario relay-200   --scenario relay --sessions 200 --duration 20s --rate 20 --packet-bytes 32
  scenario relay-64-burst  --scenario relay --sessions 64 --duration 20s --rate 50 --packet-bytes 32 --arrivals burst
  scenario relay-200-burst --scenario relay --sessions 200 --duration 20s --rate 20 --packet-bytes 32 --arrivals burst
  memory_scenario relay-64-memory  --scenario relay --sessions 64 --duration 20s --rate 50 --packet-bytes 32
  memory_scenario relay-200-memory --scenario relay --sessions 200 --duration 20s --rate 20 --packet-bytes 32
  scenario throughput  --scenario throughput --sessions 8 --duration 20s --packet-bytes 64 --streams-per-conn 2
  memory_scenario throughput-memory --scenario throughput --sessions 8 --duration 20s --packet-bytes 64 --streams-per-conn 2
  scenario throughput-ingest --scenario throughput --sessions 8 --duration 20s --packet-bytes 64 --streams-per-conn 2 --watchers 0
  scenario idle        --scenario idle --sessions 20000 --duration 15s --streams-per-conn 100
  scenario tools       --scenario tools --sessions 50 --duration 15s --rate 20
  scenario tools-burst --scenario tools --sessions 50 --duration 15s --rate 20 --arrivals burst
  scenario tools-durable --scenario tools --sessions 50 --duration 10s --rate 20 --provider-idempotent=false
  policy_scenario policy-50 --sessions 50 --duration 20s --rate 50 --packet-bytes 16
  policy_scenario policy-200 --sessions 200 --duration 20s --rate 20 --packet-bytes 16
fi
python_commander_stop
# stop-flood with the real commander: one process, 8 slots flooding, each task cancelled.
python_driver py-stop-flood bench_pystopflood.py
# Scenario 6: one real commander process flooding vs raw grpc.aio.
python_driver python-ceiling bench_pyceiling.py
# Scenario 7: the same events via FastAPI+JSON+SSE vs WatchTask.
python_driver rest-vs-grpc bench_rest.py
python_driver fleet bench_fleet.py # issue 13: 3 replicas + PostgreSQL + Redis vs this single node
python_driver byclaw-peer bench_byclaw.py
[[ -z "$ONLY" || a2a-vs-watch == *"$ONLY"* ]] && { log "scenario a2a-vs-watch: scripts/bench_a2a.py (A2A streaming vs WatchTask; its own dispatcher)"; BENCH_DISPATCHER=$DISPATCHER BENCH_QUICK=$QUICK BENCH_RESULTS=$RESULTS "$ROOT/.venv/bin/python" "$ROOT/scripts/bench_a2a.py" 2> >(tee "$OUT/a2a-vs-watch.txt" >&2) || FAILED+=(a2a-vs-watch); }
if [ -z "$ONLY" ] || [[ mcp-vs-provider == *"$ONLY"* ]]; then log "scenario mcp-vs-provider: scripts/bench_mcp.py (issue 15: its own dispatcher with --mcp-servers)"; DISPATCH_BIN=$DISPATCHER BENCH_QUICK=$QUICK BENCH_RESULTS=$RESULTS "$ROOT/.venv/bin/python" "$ROOT/scripts/bench_mcp.py" 2> >(tee "$OUT/mcp-vs-provider.txt" >&2) || FAILED+=(mcp-vs-provider); fi
policy_eval

# --- the table ---------------------------------------------------------------
echo
echo "== results ($((SECONDS - START)) s; raw: $RESULTS)"
if [ -s "$RESULTS" ]; then
  "$BIN/loadgen" report "$RESULTS" || true
fi
if [ -s "$OUT/policy-eval.txt" ]; then
  echo
  echo "== policy evaluation per packet (go test -bench BenchmarkEvaluate ./internal/policy/; 1/10/100 CEL rules + a phrase rule + limits)"
  cat "$OUT/policy-eval.txt"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  echo
  echo "FAILED scenario runs:"
  printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
