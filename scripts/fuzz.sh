#!/usr/bin/env bash
# fuzz.sh TIME PKG:TARGET... — time-boxed Go fuzzing, one target at a time
# (run from dispatcher_go/). A target fails when an input fails: go test
# then writes it to the package's testdata/fuzz/<Target>/ and says so.
#
# One failure is not the target's: go1.26's fuzz coordinator can report the
# -fuzztime deadline itself as "context deadline exceeded" when a worker is
# mid-input at the deadline (go.dev/issue/75804, fixed in go1.27). Such a run
# wrote no input; it is reported and not counted.
set -uo pipefail
time=$1; shift
for t in "$@"; do
  pkg=${t%%:*} target=${t#*:}
  echo "fuzz $target ($pkg) for $time"
  out=$(mktemp)
  go test -run '^$' -fuzz "^${target}\$" -fuzztime "$time" -fuzzminimizetime 2s "$pkg" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    if grep -q 'context deadline exceeded' "$out" && ! grep -q 'Failing input written to' "$out"; then
      echo "fuzz $target: the coordinator's deadline race (go.dev/issue/75804), no input failed — not counted"
    else
      rm -f "$out"; exit "$rc"
    fi
  fi
  rm -f "$out"
done
