# Process helpers shared by scripts/stack.sh and scripts/fleet.sh (sourced).
# The caller sets RUN (where NAME.pid and NAME.log live) and defines log().

# stop_one NAME [TENTHS]: SIGTERM the process in $RUN/NAME.pid, wait up to
# TENTHS tenths of a second (default 50) for it to exit, then SIGKILL.
stop_one() {
  local pidf=$RUN/$1.pid tenths=${2:-50}
  [ -f "$pidf" ] || return 0
  local pid; pid=$(cat "$pidf")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 "$tenths"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidf"
}

# wait_for NAME SECONDS CMD...: poll CMD until it succeeds; fail with the log tail.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
      log "$name exited; last lines of $RUN/$name.log:"; tail -n 30 "$RUN/$name.log" >&2; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      log "$name not ready after ${secs}s; last lines of $RUN/$name.log:"; tail -n 30 "$RUN/$name.log" >&2; return 1
    fi
    sleep 0.2
  done
}

port_free() { ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
