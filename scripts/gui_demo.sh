#!/usr/bin/env bash
# The GUI agent end to end on this machine, every piece real except the model:
# the local sandbox server (Xvfb + xdotool), the dispatcher, a commander running
# the `gui` planner with the computer.* tools in-process (the unmodified lybic
# SDK pointed at the local server), and scriptedllm replaying a UI-TARS
# trajectory (scripts/gui_demo/trajectory.json). The sandbox shows an xterm
# running `cat > FILE`; the agent clicks into it and types a line, and FILE
# proves it.
#
#   scripts/gui_demo.sh ["instruction"]
#
# GUI_LLM_BASE_URL / GUI_LLM_MODEL / GUI_LLM_API_KEY: use a real vision model
# (UI-TARS, Doubao UI-TARS) instead of the scripted one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
BIN=$ROOT/bin
RUN=$ROOT/.run/gui-demo
INSTRUCTION=${1:-"Type 'hello from the GUI agent' into the terminal"}
rm -rf "$RUN"; mkdir -p "$RUN"
export LOCALSANDBOX_API_KEY=lysk-demo-$$ LYBIC_API_KEY=lysk-demo-$$ LYBIC_ORG_ID=ORG-demo

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$RUN/$name.log" 2>&1 & PIDS+=($!); }
addr() { # addr NAME FILE: wait for the address file a server writes
  for _ in $(seq 1 300); do
    [ -s "$2" ] && { cat "$2"; return; }
    sleep 0.1
  done
  echo "$1 did not start; see $RUN/$1.log" >&2; tail -n 20 "$RUN/$1.log" >&2; exit 1
}

start sandbox "$PY" -m localsandbox --listen 127.0.0.1:0 --addr-file "$RUN/sandbox.addr" \
  --org-id "$LYBIC_ORG_ID" --state-dir "$RUN/sandbox-state"
start dispatcher "$BIN/dispatcher" --listen 127.0.0.1:0 --addr-file "$RUN/dispatcher.addr" --log-format text
if [ -z "${GUI_LLM_BASE_URL:-}" ]; then
  start model "$BIN/scriptedllm" --listen 127.0.0.1:0 --addr-file "$RUN/model.addr" \
    --script scripts/gui_demo/trajectory.json --tokens-per-sec 200 --model ui-tars-scripted
  GUI_LLM_BASE_URL=http://$(addr model "$RUN/model.addr")/v1
  GUI_LLM_MODEL=ui-tars-scripted
fi
SANDBOX=http://$(addr sandbox "$RUN/sandbox.addr")
DISPATCHER=$(addr dispatcher "$RUN/dispatcher.addr")

# A sandbox with an xterm running `cat > out.txt`, as a precreated sandbox.
SID=$(OUT="$RUN/out.txt" SANDBOX="$SANDBOX" "$PY" - <<'PYEOF'
import os, anyio
from lybic import LybicAuth, LybicClient, Sandbox

async def main() -> None:
    auth = LybicAuth(org_id=os.environ["LYBIC_ORG_ID"], api_key=os.environ["LYBIC_API_KEY"],
                     endpoint=os.environ["SANDBOX"])
    async with LybicClient(auth, max_retries=0) as client:
        s = Sandbox(client)
        sb = await s.create(name="gui-demo", shape="local-1024x768")
        out = os.environ["OUT"]
        await s.execute_process(sb.id, executable="/bin/sh", args=["-c",
            f"xterm -geometry 80x24+0+0 -e sh -c 'cat > {out}' >/dev/null 2>&1 &"])
        for _ in range(100):
            r = await s.execute_process(sb.id, executable="xdotool",
                                        args=["search", "--onlyvisible", "--class", "xterm"])
            if r.exitCode == 0:
                break
            await anyio.sleep(0.1)
        await anyio.sleep(0.5)
        print(sb.id)

anyio.run(main)
PYEOF
)
export LYBIC_PRECREATE_SID=$SID
start commander "$PY" -m commander --dispatcher "$DISPATCHER" --slots 1 \
  --gui-base-url "$GUI_LLM_BASE_URL" --gui-model "${GUI_LLM_MODEL:-ui-tars}" \
  --sandbox-endpoint "$SANDBOX" --sandbox-org "$LYBIC_ORG_ID"
for _ in $(seq 1 100); do
  "$BIN/dispatchctl" --addr "$DISPATCHER" tools 2>/dev/null | grep -q computer.type && break
  sleep 0.1
done
"$BIN/dispatchctl" --addr "$DISPATCHER" run --planner gui "$INSTRUCTION" | cut -c1-240
echo "--- what the xterm received ($RUN/out.txt):"
cat "$RUN/out.txt"
