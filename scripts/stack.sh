#!/usr/bin/env bash
# Starts and stops the local stack: SmolLM2 behind llama-cpp-python's
# OpenAI-compatible server, the dispatcher, the local sandbox server (Xvfb +
# xdotool) with a desktop (an xterm running `cat > .run/xterm.txt`, focused),
# a commander (chat and gui planners, the computer.* sandbox tools in-process
# over the lybic SDK) and a tool provider.
#
#   scripts/stack.sh up                 start in the background (pids and logs in .run/)
#   scripts/stack.sh down               stop what `up` started
#   scripts/stack.sh demo "text" ["gui text"]
#                                       up, run the chat instruction, then the GUI
#                                       instruction on the local desktop (gui planner,
#                                       SmolLM2 reading a text description of the screen),
#                                       show what the xterm received, down
#   scripts/stack.sh model-test         start only the model server, run the `model` tests
#
# Ports: DISPATCHER_LISTEN (127.0.0.1:50051), MODEL_PORT (8080); the sandbox
# server takes a free port. GUI_MAX_STEPS (5): the GUI task's step limit.
# Everything listens on loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/.run
PY=$ROOT/.venv/bin/python
BIN=$ROOT/bin
DISPATCHER_LISTEN=${DISPATCHER_LISTEN:-127.0.0.1:50051}
MODEL_PORT=${MODEL_PORT:-8080}
COMMANDER_SLOTS=${COMMANDER_SLOTS:-2}
GUI_MAX_STEPS=${GUI_MAX_STEPS:-5}
GUI_INSTRUCTION_DEFAULT="Type 'hello from SmolLM2' into the terminal."
mkdir -p "$RUN"

log() { printf '\033[2m[stack]\033[0m %s\n' "$*" >&2; }

# start NAME CMD...: run CMD in the background, log to .run/NAME.log, pid in .run/NAME.pid
start() {
  local name=$1; shift
  "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

# stop_one, wait_for, port_free
. "$ROOT/scripts/_proclib.sh"

model_up() {
  local model; model=$("$PY" "$ROOT/scripts/model_path.py")
  port_free 127.0.0.1 "$MODEL_PORT" || { log "port $MODEL_PORT is taken; set MODEL_PORT"; exit 1; }
  log "model server: SmolLM2-135M-Instruct ($model) on 127.0.0.1:$MODEL_PORT"
  # Unbuffered: the log tells at once when a client closed its stream (test-model reads it).
  start model env PYTHONUNBUFFERED=1 "$PY" -m llama_cpp.server --model "$model" --model_alias smollm2 \
    --host 127.0.0.1 --port "$MODEL_PORT" --n_ctx 4096 --n_threads "$(nproc)"
  wait_for model 120 "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$MODEL_PORT/v1/models', timeout=2)"
}

up() {
  model_up
  local host=${DISPATCHER_LISTEN%:*} port=${DISPATCHER_LISTEN##*:}
  port_free "$host" "$port" || { log "$DISPATCHER_LISTEN is taken; set DISPATCHER_LISTEN"; exit 1; }
  sandbox_up
  log "dispatcher on $DISPATCHER_LISTEN (POST /api/sandbox/create: the local sandbox server)"
  rm -f "$RUN/dispatcher.addr"
  DISPATCHER_SANDBOX_API_KEY=$(cat "$RUN/sandbox.key") \
  start dispatcher "$BIN/dispatcher" --listen "$DISPATCHER_LISTEN" --addr-file "$RUN/dispatcher.addr" --data-dir "$RUN/data" --log-format text \
    --sandbox-endpoint "http://$(cat "$RUN/sandbox.addr")" --sandbox-org ORG-local --sandbox-shape local-1280x720
  wait_for dispatcher 30 test -s "$RUN/dispatcher.addr"
  log "tool provider (workspace tools in $RUN/workspace)"
  mkdir -p "$RUN/workspace"
  start tools "$ROOT/.venv/bin/commander-tools" --dispatcher "$DISPATCHER_LISTEN" --root "$RUN/workspace"
  log "commander with $COMMANDER_SLOTS slots, model smollm2"
  LYBIC_API_KEY=$(cat "$RUN/sandbox.key") LYBIC_PRECREATE_SID=$(cat "$RUN/desktop.sid") \
  start commander "$ROOT/.venv/bin/commander" --dispatcher "$DISPATCHER_LISTEN" --slots "$COMMANDER_SLOTS" \
    --llm-exclude-tools "computer.,mobile." \
    --llm-base-url "http://127.0.0.1:$MODEL_PORT/v1" --llm-model smollm2 \
    --gui-model smollm2 --gui-max-steps "$GUI_MAX_STEPS" \
    --sandbox-endpoint "http://$(cat "$RUN/sandbox.addr")" --sandbox-org ORG-local
  wait_for commander 60 "$BIN/dispatchctl" --addr "$DISPATCHER_LISTEN" info --min-slots "$COMMANDER_SLOTS"
  log "stack is up: dispatcher $DISPATCHER_LISTEN, model http://127.0.0.1:$MODEL_PORT/v1 (logs: $RUN/*.log)"
}

# The local sandbox server, and a desktop on it: an xterm whose typed lines go
# to $RUN/xterm.txt (its id becomes the commander's LYBIC_PRECREATE_SID).
sandbox_up() {
  log "local sandbox server (Xvfb + xdotool), a desktop with an xterm"
  rm -f "$RUN/sandbox.addr" "$RUN/xterm.txt"
  [ -s "$RUN/sandbox.key" ] || (umask 077; "$PY" -c 'import secrets; print("lysk-" + secrets.token_hex(16))' >"$RUN/sandbox.key")
  LOCALSANDBOX_API_KEY=$(cat "$RUN/sandbox.key") \
  start sandbox "$PY" -m localsandbox --listen 127.0.0.1:0 --addr-file "$RUN/sandbox.addr" \
    --org-id ORG-local --state-dir "$RUN/sandbox-state"
  wait_for sandbox 30 test -s "$RUN/sandbox.addr"
  LYBIC_API_ENDPOINT="http://$(cat "$RUN/sandbox.addr")" LYBIC_ORG_ID=ORG-local \
    LYBIC_API_KEY=$(cat "$RUN/sandbox.key") \
    "$PY" "$ROOT/scripts/local_desktop.py" "$RUN/xterm.txt" >"$RUN/desktop.sid"
}

down() {
  for n in commander tools sandbox dispatcher model; do stop_one "$n"; done
}

case "${1:-}" in
  up) up ;;
  down) down; log "stack stopped" ;;
  demo)
    trap down EXIT
    up
    log "running: $2"
    "$BIN/dispatchctl" --addr "$DISPATCHER_LISTEN" run "$2"
    gui=${3:-$GUI_INSTRUCTION_DEFAULT}
    log "running on the local desktop (gui planner, at most $GUI_MAX_STEPS steps): $gui"
    "$BIN/dispatchctl" --addr "$DISPATCHER_LISTEN" run --planner gui "$gui" | cut -c1-240 || true
    log "what the xterm received ($RUN/xterm.txt):"
    cat "$RUN/xterm.txt" 2>/dev/null || true
    echo
    ;;
  model-test)
    trap 'stop_one model' EXIT
    MODEL_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    model_up
    LOCAL_LLM_BASE_URL="http://127.0.0.1:$MODEL_PORT/v1" LOCAL_LLM_LOG="$RUN/model.log" DISPATCH_BIN_DIR="$BIN" \
      "$ROOT/.venv/bin/pytest" -q -m model tests
    ;;
  *) echo "usage: $0 up|down|demo INSTRUCTION [GUI_INSTRUCTION]|model-test" >&2; exit 2 ;;
esac
