#!/usr/bin/env bash
# What turning tracing on costs the dispatcher: the throughput-ingest and
# tools scenarios of scripts/bench.sh with OTEL_TRACES_EXPORTER unset and
# with it set to otlp (exporting to scripts/otlp_sink.py on loopback),
# alternated ROUNDS times (default 2), in one sitting. Prints one table per
# run; compare the pairs (the machine is noisy).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-.run/bench-tracing}
ROUNDS=${ROUNDS:-2}
rm -rf "$OUT" && mkdir -p "$OUT"
make -s build >/dev/null

.venv/bin/python scripts/otlp_sink.py "$OUT/sink.addr" >"$OUT/sink.log" 2>&1 &
SINK=$!
trap 'kill -TERM $SINK 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do [ -s "$OUT/sink.addr" ] && break; sleep 0.1; done
ENDPOINT=http://$(cat "$OUT/sink.addr")

for round in $(seq 1 "$ROUNDS"); do
  for mode in off on; do
    for only in throughput-ingest tools; do
      dir=$OUT/$round-$mode-$only
      if [ $mode = on ]; then
        OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=$ENDPOINT \
          BENCH_OUT=$dir BENCH_ONLY=$only scripts/bench.sh >"$dir.txt" 2>&1
      else
        env -u OTEL_TRACES_EXPORTER BENCH_OUT=$dir BENCH_ONLY=$only scripts/bench.sh >"$dir.txt" 2>&1
      fi
      echo "== round $round, tracing $mode, $only"
      grep -E 'events logged|dispatcher CPU|round trip|tool calls' "$dir.txt" | grep -v '^\s*$' | sed -n '/== results/,$p;/^'"$only"'/p' | sort -u
    done
  done
done
kill -TERM $SINK; wait $SINK || true
cat "$OUT/sink.log"
