#!/usr/bin/env bash
# Runs the protocols' own conformance kits against a local stack (a
# dispatcher, a commander and the scripted model, loopback only). It fetches
# nothing: give it a checkout of the kit, with its dependencies installed.
# Not part of `make test`. Results and logs go to $OUT (.run/conformance).
#
#   scripts/conformance.sh a2a TCK_DIR [PYTHON]
#       The A2A TCK (github.com/a2aproject/a2a-tck): categories `mandatory` on
#       the JSON-RPC binding, `mandatory` on the gRPC binding, and
#       `capabilities` (JSON-RPC). PYTHON: a python with the TCK's
#       requirements (default TCK_DIR/.venv/bin/python), e.g.
#         python3 -m venv /tmp/tck-venv && /tmp/tck-venv/bin/pip install -r TCK_DIR/requirements.txt \
#           pytest-json-report python-dotenv grpcio-status proto-plus pyOpenSSL aiohttp
#   scripts/conformance.sh mcp KIT_DIR
#       The MCP conformance suite (github.com/modelcontextprotocol/conformance,
#       `npm install` done in KIT_DIR): the server scenarios a spec revision
#       requires, for 2026-07-28 and 2025-11-25, against /mcp.
#
# Two things the kits need that are not ours to change (docs/a2a.md):
# - the TCK sends no A2A-Version header, which the spec reads as 0.3; it is
#   given "A2A-Version: 1.0" through its A2A_AUTH_HEADERS hook;
# - the TCK's gRPC client parses only grpc://host:port (or an http URL) as
#   the card's gRPC interface URL, while we declare host:port (what the
#   a2a-go and a2a-sdk clients dial); for the gRPC run a small card server
#   beside the stack rewrites that one URL.
# The MCP kit imports fs.globSync (Node 22) in its tier-check module only; on
# Node 20 drop it from the import in src/tier-check/checks/test-conformance-results.ts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/.run/conformance}
PY=${COMMANDER_PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$OUT"

kit=${1:-}
dir=${2:-}
if [ -z "$kit" ] || [ -z "$dir" ] || [ ! -d "$dir" ]; then
  sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
dir=$(cd "$dir" && pwd)

log() { printf '[conformance] %s\n' "$*" >&2; }

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_file() { # FILE SECONDS
  for _ in $(seq 1 $(($2 * 10))); do [ -s "$1" ] && return 0; sleep 0.1; done
  log "no $1 after $2 s"; return 1
}

stack() {
  log "building the dispatcher and the scripted model"
  (cd dispatcher_go && go build -o "$OUT/dispatcher" ./cmd/dispatcher && go build -o "$OUT/scriptedllm" ./cmd/scriptedllm)
  rm -f "$OUT"/*.addr
  # 60 tokens at 15/s: a task runs about 4 s, long enough for the TCK's
  # resubscribe tests (2 x TCK_STREAMING_TIMEOUT).
  "$OUT/scriptedllm" --listen 127.0.0.1:0 --addr-file "$OUT/llm.addr" --tokens 60 --tokens-per-sec 15 >"$OUT/llm.log" 2>&1 &
  pids+=($!)
  "$OUT/dispatcher" --listen 127.0.0.1:0 --addr-file "$OUT/grpc.addr" --http-listen 127.0.0.1:0 \
    --storage-backend memory --log-format text >"$OUT/dispatcher.log" 2>&1 &
  pids+=($!)
  wait_file "$OUT/llm.addr" 20
  wait_file "$OUT/grpc.addr" 20
  for _ in $(seq 1 100); do
    HTTP=$(sed -n 's/.*msg="http api serving" addr=\([^ ]*\).*/\1/p' "$OUT/dispatcher.log" | head -1)
    [ -n "$HTTP" ] && break
    sleep 0.1
  done
  [ -n "$HTTP" ] || { log "the dispatcher's HTTP API did not start"; tail -20 "$OUT/dispatcher.log"; exit 1; }
  GRPC=$(cat "$OUT/grpc.addr")
  local llm="http://$(cat "$OUT/llm.addr")/v1"
  PYTHONPATH=$ROOT "$PY" -m commander --dispatcher "$GRPC" --slots 4 --llm-base-url "$llm" \
    --llm-model scripted --llm-api-key sk-test-not-a-real-key --llm-allowed-endpoints "$llm" \
    --id conformance --log-level info >"$OUT/commander.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    grep -q 'commander slot connected' "$OUT/dispatcher.log" && break
    sleep 0.1
  done
  log "stack up: HTTP $HTTP, gRPC $GRPC"
}

a2a() {
  local tpy=${3:-$dir/.venv/bin/python}
  stack
  # The card as the TCK's gRPC client reads it (see above).
  "$PY" - "$HTTP" >"$OUT/cardserver.log" 2>&1 <<'EOF' &
import json, sys, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
up = "http://" + sys.argv[1]
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/.well-known/agent-card.json":
            self.send_response(404); self.end_headers(); return
        card = json.load(urllib.request.urlopen(up + self.path))
        for i in card.get("supportedInterfaces", []):
            if i["protocolBinding"] == "GRPC" and "://" not in i["url"]:
                i["url"] = "grpc://" + i["url"]
        b = json.dumps(card).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
s = HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
EOF
  pids+=($!)
  wait_file "$OUT/cardserver.log" 10
  local card_port; card_port=$(head -1 "$OUT/cardserver.log")
  export A2A_AUTH_HEADERS='{"A2A-Version":"1.0"}' TCK_STREAMING_TIMEOUT=${TCK_STREAMING_TIMEOUT:-2.0}
  local rc=0
  (cd "$dir" && "$tpy" run_tck.py --sut-url "http://$HTTP/a2a" --category mandatory --transports jsonrpc) \
    >"$OUT/a2a-mandatory-jsonrpc.log" 2>&1 || rc=1
  (cd "$dir" && "$tpy" run_tck.py --sut-url "http://127.0.0.1:$card_port" --category mandatory \
    --transports grpc --transport-strategy prefer_grpc) >"$OUT/a2a-mandatory-grpc.log" 2>&1 || rc=1
  (cd "$dir" && "$tpy" run_tck.py --sut-url "http://$HTTP/a2a" --category capabilities --transports jsonrpc) \
    >"$OUT/a2a-capabilities-jsonrpc.log" 2>&1 || rc=1
  for f in a2a-mandatory-jsonrpc a2a-mandatory-grpc a2a-capabilities-jsonrpc; do
    printf '%-28s %s\n' "$f" "$(grep -E '[0-9]+ (passed|failed)' "$OUT/$f.log" | tail -1)"
  done
  log "logs in $OUT; the failures and why they are the kit's: docs/a2a.md#the-a2a-tck"
  return $rc
}

mcp() {
  stack
  local rc=0 run=(npx tsx src/index.ts)
  [ -f "$dir/dist/index.js" ] && run=(node dist/index.js)
  for rev in 2026-07-28 2025-11-25; do
    (cd "$dir" && "${run[@]}" server --url "http://$HTTP/mcp" --requirements "$rev") \
      >"$OUT/mcp-$rev.log" 2>&1 || rc=1
    printf '%-12s %s\n' "$rev" "$(grep -E '^Total:' "$OUT/mcp-$rev.log" | tail -1)"
  done
  log "logs in $OUT; the failures and why they are the kit's fixtures: docs/mcp.md#the-mcp-conformance-suite"
  return $rc
}

case $kit in
  a2a) a2a "$@" ;;
  mcp) mcp "$@" ;;
  *) log "unknown kit $kit (a2a or mcp)"; exit 2 ;;
esac
