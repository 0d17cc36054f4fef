#!/usr/bin/env bash
# Starts and stops a fleet on one machine: PostgreSQL (scripts/postgres.sh),
# Redis (scripts/redis.sh), three dispatcher replicas, the local model
# (SmolLM2 behind llama-cpp-python), two commanders and a tool provider per
# replica.
#
#   scripts/fleet.sh up     start in the background (pids and logs in .run/fleet/)
#   scripts/fleet.sh down   stop what `up` started (PostgreSQL and Redis too)
#
# An `up` that fails partway stops what it started (processes by the pids
# it recorded; PostgreSQL and Redis only if they were not running before
# it), never a fleet already up: `up` refuses to start while a process of
# .run/fleet/*.pid is alive. FLEET_RUN_DIR moves .run/fleet (tests).
#
# Replica N (1..3): gRPC 127.0.0.1:5005N, HTTP 127.0.0.1:808(7+N) (bases
# FLEET_GRPC_PORT=50051, FLEET_HTTP_PORT=8088), pid in
# .run/fleet/dispatcher-N.pid, id replica-N. Each commander is given every
# replica's address when it takes several (comma list), else one replica
# each. Everything listens on loopback only. MODEL_PORT (8080).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=${FLEET_RUN_DIR:-$ROOT/.run/fleet}
PY=$ROOT/.venv/bin/python
BIN=$ROOT/bin
MODEL_PORT=${MODEL_PORT:-8080}
FLEET_GRPC_PORT=${FLEET_GRPC_PORT:-50051}
FLEET_HTTP_PORT=${FLEET_HTTP_PORT:-8088}
COMMANDER_SLOTS=${COMMANDER_SLOTS:-2}
export PG_STATE_DIR=${PG_STATE_DIR:-/tmp/agentdispatch-fleet-pg}
# A commit waits for its WAL write: with scripts/postgres.sh's default (off) a
# PostgreSQL crash or `postgres.sh kill` drops the last few hundred ms of
# acknowledged commits, so events a watcher was sent, and upstream packets
# the commander was told were recorded (never resent), vanish: the task ends
# SUCCESS with an "event_missing" hole. The fleet promises a PostgreSQL
# restart loses no event.
export PG_SYNCHRONOUS_COMMIT=${PG_SYNCHRONOUS_COMMIT:-on}
export REDIS_STATE_DIR=${REDIS_STATE_DIR:-/tmp/agentdispatch-fleet-redis}
mkdir -p "$RUN"

log() { printf '\033[2m[fleet]\033[0m %s\n' "$*" >&2; }

# What this `up` started ("NAME:PID", in order) and whether it started
# PostgreSQL and Redis: what a failed `up` stops (undo_up).
STARTED=()
OWN_PG=0
OWN_REDIS=0

# start NAME CMD...: run CMD in the background, log to $RUN/NAME.log, pid in $RUN/NAME.pid
start() {
  local name=$1; shift
  "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
  STARTED+=("$name:$!")
}

# undo_up (EXIT trap of up): if up failed, stop what it started, newest
# first, and nothing else: a process whose pid file names another pid is
# not this run's.
undo_up() {
  local rc=$?
  [ "$rc" -eq 0 ] && return 0
  log "up failed: stopping what it started"
  local i name pid
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    name=${STARTED[i]%%:*} pid=${STARTED[i]#*:}
    if [ "$(cat "$RUN/$name.pid" 2>/dev/null)" = "$pid" ]; then
      stop_one "$name" 50
    fi
  done
  if [ "$OWN_REDIS" = 1 ]; then scripts/redis.sh stop >/dev/null 2>&1 || true; fi
  if [ "$OWN_PG" = 1 ]; then scripts/postgres.sh stop >/dev/null 2>&1 || true; fi
  return "$rc"
}

# stop_one, wait_for, port_free
. "$ROOT/scripts/_proclib.sh"

up() {
  local dsn redis pidf
  # A second `up` would overwrite the first's pid files, and its failure
  # must not stop the first's processes.
  for pidf in "$RUN"/*.pid; do
    if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
      log "a fleet is up already ($pidf is alive): scripts/fleet.sh down first"
      exit 1
    fi
  done
  trap undo_up EXIT
  scripts/postgres.sh dsn >/dev/null 2>&1 || OWN_PG=1
  dsn=$(scripts/postgres.sh start)
  scripts/redis.sh url >/dev/null 2>&1 || OWN_REDIS=1
  redis=$(scripts/redis.sh start)
  log "PostgreSQL $dsn, Redis $redis"
  local model; model=$("$PY" "$ROOT/scripts/model_path.py")
  port_free 127.0.0.1 "$MODEL_PORT" || { log "port $MODEL_PORT is taken; set MODEL_PORT"; exit 1; }
  log "model server: SmolLM2 on 127.0.0.1:$MODEL_PORT"
  start model "$PY" -m llama_cpp.server --model "$model" --model_alias smollm2 \
    --host 127.0.0.1 --port "$MODEL_PORT" --n_ctx 4096 --n_threads "$(nproc)"
  log "model pid $(cat "$RUN/model.pid")"
  wait_for model 120 "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$MODEL_PORT/v1/models', timeout=2)"
  local addrs=()
  for n in 1 2 3; do
    local grpc=127.0.0.1:$((FLEET_GRPC_PORT + n - 1)) http=127.0.0.1:$((FLEET_HTTP_PORT + n - 1))
    port_free 127.0.0.1 "${grpc##*:}" || { log "$grpc is taken; set FLEET_GRPC_PORT"; exit 1; }
    port_free 127.0.0.1 "${http##*:}" || { log "$http is taken; set FLEET_HTTP_PORT"; exit 1; }
    log "dispatcher replica-$n: gRPC $grpc, HTTP $http"
    rm -f "$RUN/dispatcher-$n.addr"
    start "dispatcher-$n" "$BIN/dispatcher" --listen "$grpc" --http-listen "$http" \
      --addr-file "$RUN/dispatcher-$n.addr" --log-format text \
      --storage-backend postgres --postgres-dsn "$dsn" \
      --fleet-redis "$redis" --replica-id "replica-$n"
    wait_for "dispatcher-$n" 30 test -s "$RUN/dispatcher-$n.addr"
    addrs+=("$grpc")
  done
  # A replica offers the tools of the providers connected to it only (a
  # provider's tools are not routed across replicas): one provider per
  # replica, or a task whose session runs on replica 2 or 3 was not offered
  # the workspace tools (and a call of one was "unknown tool"), and
  # ListTools differed by replica. Each keeps to its replica's address (a
  # second provider of the same tools on one replica is refused).
  mkdir -p "$RUN/workspace"
  for n in 1 2 3; do
    log "tool provider $n (workspace tools in $RUN/workspace) on replica-$n"
    start "tools-$n" "$ROOT/.venv/bin/commander-tools" --dispatcher "${addrs[$((n - 1))]}" --root "$RUN/workspace"
  done
  for c in 1 2; do
    # Every commander gets all three addresses (a lost stream, a move from a
    # draining replica, re-attaches its sessions to the next), each
    # starting at its own replica so that the slots spread.
    local target; target=$(IFS=,; echo "${addrs[*]:$((c - 1))},${addrs[*]:0:$((c - 1))}")
    target=${target%,}
    log "commander-$c ($COMMANDER_SLOTS slots) → $target"
    start "commander-$c" "$ROOT/.venv/bin/commander" --dispatcher "$target" --slots "$COMMANDER_SLOTS" \
      --id "fleet-commander-$c" --llm-exclude-tools "computer.,mobile." \
      --llm-base-url "http://127.0.0.1:$MODEL_PORT/v1" --llm-model smollm2
  done
  wait_for commander-2 60 "$BIN/dispatchctl" --addr "${addrs[0]}" info --min-slots $((2 * COMMANDER_SLOTS))
  trap - EXIT
  log "fleet is up: gRPC ${addrs[*]}, HTTP ports $FLEET_HTTP_PORT-$((FLEET_HTTP_PORT + 2)) (logs: $RUN/*.log)"
}

down() {
  for n in commander-1 commander-2 tools tools-1 tools-2 tools-3 dispatcher-1 dispatcher-2 dispatcher-3 model; do stop_one "$n" 100; done
  scripts/redis.sh stop >/dev/null 2>&1 || true
  scripts/postgres.sh stop >/dev/null 2>&1 || true
}

case "${1:-}" in
  up) up ;;
  down) down; log "fleet stopped" ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
