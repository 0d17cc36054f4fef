"""Joins the two halves of the tool round-trip trace and prints its legs.

Run a tools scenario with both traces on, then join them::

    DISPATCHER_TOOL_TRACE=/tmp/d.txt LOADGEN_TOOL_TRACE=/tmp/l.txt \
        BENCH_ONLY=tools scripts/bench.sh
    python3 scripts/tool_legs.py /tmp/d.txt /tmp/l.txt

(BENCH_ONLY=tools runs tools-burst too and both append to the files: delete
them between runs, or run one label.) The dispatcher's lines are written by
internal/session/tooltrace.go, loadgen's by cmd/loadgen/tools.go. Per tool it
prints each leg's p50/p90/p99 and its mean among the slowest 1 % of calls
and among the calls between p90 and p99: where the tail's time goes.
"""

from __future__ import annotations

import statistics
import sys

LEGS = (
    "up (commander Send -> toolCall)",
    "exec (-> dispatched)",
    "provider (-> result)",
    "record + push",
    "wake (push -> taken)",
    "Send",
    "down (Send -> commander Recv)",
    "commander hand-off",
    "total",
)


def read_dispatcher(path: str) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) == 9 and not line.startswith("#"):
                out[(fields[0], fields[1])] = [int(x) for x in fields[2:]]
    return out


def legs_of(d: list[int], sent: int, recv: int, got: int) -> list[int]:
    _emitted, received, dispatched, resulted, pushed, taken, done = d
    return [
        received - sent,
        dispatched - received,
        resulted - dispatched,
        pushed - resulted,
        taken - pushed,
        done - taken,
        recv - done if recv else 0,
        got - recv if recv else 0,
        got - sent,
    ]


def quantile(values: list[int], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] / 1e3


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: tool_legs.py DISPATCHER_TRACE LOADGEN_TRACE")
    disp = read_dispatcher(sys.argv[1])
    rows: dict[str, list[list[int]]] = {}
    with open(sys.argv[2]) as f:
        for line in f:
            fields = line.split()
            if len(fields) != 6 or (fields[0], fields[1]) not in disp:
                continue
            sent, recv, got = (int(x) for x in fields[3:])
            legs = legs_of(disp[(fields[0], fields[1])], sent, recv, got)
            rows.setdefault(fields[2], []).append(legs)
    for tool, calls in rows.items():
        totals = sorted(c[-1] for c in calls)
        p90 = totals[int(len(totals) * 0.9)]
        p99 = totals[min(len(totals) - 1, int(len(totals) * 0.99))]
        slow = [c for c in calls if c[-1] >= p99]
        mid = [c for c in calls if p90 <= c[-1] < p99] or slow
        print(f"== {tool}: {len(calls)} calls (µs)")
        print(f"{'leg':32} {'p50':>8} {'p90':>8} {'p99':>8} {'slowest 1%':>11} {'p90-p99':>9}")
        for i, name in enumerate(LEGS):
            v = [c[i] for c in calls]
            qs = " ".join(f"{quantile(v, q):8.1f}" for q in (0.5, 0.9, 0.99))
            tail = statistics.mean(c[i] for c in slow) / 1e3
            between = statistics.mean(c[i] for c in mid) / 1e3
            print(f"{name:32} {qs} {tail:11.1f} {between:9.1f}")


if __name__ == "__main__":
    main()
