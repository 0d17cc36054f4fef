"""One cancel's and one event's legs in the fleet bench, joined by task (and seq).

    DISPATCHER_FLEET_LEG_STATS=1 DISPATCHER_FLEET_LEG_DUMP=DIR BENCH_FLEET_RELAY_ONLY=1 \\
      BENCH_FLEET_DUMP=DIR/dump.jsonl BENCH_RESULTS=DIR/results.jsonl \\
      .venv/bin/python scripts/bench_fleet.py
    .venv/bin/python scripts/fleet_legs.py DIR [DIR...]

DIR/dump.jsonl is the bench's own samples (BENCH_FLEET_DUMP); DIR/legs-<replica>.jsonl
each replica's (DISPATCHER_FLEET_LEG_DUMP, written when it stops). r1 runs the
sessions, r2 watches from the other side, r3 takes the cancels. Prints p50/p90/p99/max
(ms) of each leg over the bench's samples:

- stop: CancelTask sent (the driver's clock) → r3's Fleet.Cancel began (c2r3) →
  its announcement answered (ann) ; the announcement's send → received by r1 (wire)
  → the stop handed to the session (cmd) → the commander's stopped recorded
  (stopack) ; stopped recorded → its write committed (stored) → seen on r2 (rec2seen);
  and, of stored, the wait before the write began (queued: a task is in one write at
  a time, so a stopped waits for the stop's own write);
- relay: recorded → committed (stored) → received by the same-replica watcher;
  committed → XADD sent (publish) → r2's tail hub read it (xread) → r2's watcher
  received it (hub→recv).

Slow samples of different tasks at the same time point at the machine (every process
waits at once), not at one leg.
"""

from __future__ import annotations

import glob
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

Legs = dict[tuple[str, str], dict[str, tuple[int, float]]]


def q(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


def line(name: str, xs: list[float]) -> str:
    return (
        f"  {name:16s} n {len(xs):5d} p50 {q(xs, 0.5):7.2f} p90 {q(xs, 0.9):7.2f}"
        f" p99 {q(xs, 0.99):7.2f} max {max(xs) if xs else float('nan'):7.2f}"
    )


def load_legs(d: str) -> tuple[Legs, dict[str, list[tuple[str, int, float]]]]:
    legs: Legs = defaultdict(dict)
    raw: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
    for p in glob.glob(f"{d}/legs-*.jsonl"):
        r = p.split("legs-")[1][:2]
        with open(p) as f:
            for text in f:
                leg, key, end, dur = json.loads(text)
                legs[(r, leg)].setdefault(key, (end, dur / 1000))
                if r == "r1":
                    raw[leg].append((key, end, dur / 1000))
    return legs, raw


def stops(
    d: str,
    what: str,
    rows: list[list[Any]],
    get: Callable[[str, str, str], tuple[int, float] | None],
    queued_at: dict[str, list[tuple[int, float]]],
) -> None:
    """The legs of the relay phase's stops ("stop") or of the cancel storm's."""
    cols: dict[str, list[float]] = defaultdict(list)
    for _, t0, rec, recv, tid, _ in rows:
        cols["total (recorded)"].append((rec - t0) / 1000)
        cols["seen on r2"].append((recv - t0) / 1000)
        cols["rec2seen"].append((recv - rec) / 1000)
        if ann := get("r3", "cancel_to_announced", tid):
            cols["c2r3"].append((ann[0] - ann[1] * 1000 - t0) / 1000)
            cols["ann"].append(ann[1])
        for name, r, leg in (
            ("wire", "r1", "announce_to_recv"),
            ("cmd", "r1", "cmd_recv_to_ok"),
            ("stopack", "r1", "stop_to_stopped"),
            ("stored", "r1", "stopped_to_stored"),
        ):
            if v := get(r, leg, tid):
                cols[name].append(v[1])
        st = get("r1", "stopped_to_stored", tid)
        if st is not None and queued_at[tid]:
            at = st[0]
            cols["  of which queued"].append(min(queued_at[tid], key=lambda x: abs(x[0] - at))[1])
    print(f"{d}: {what}s" if rows else f"{d}: no {what} samples")
    for name, xs in cols.items():
        print(line(name, xs))


def report(d: str) -> None:
    with open(f"{d}/dump.jsonl") as f:
        bench = [json.loads(t) for t in f if t.strip()]
    legs, raw = load_legs(d)

    def get(r: str, leg: str, key: str) -> tuple[int, float] | None:
        return legs.get((r, leg), {}).get(key)

    # The wait of a stopped event before its write began: the per-event queued
    # sample of the same task closest in time to its stopped_to_stored sample.
    queued_at: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for key, end, dur in raw["recorded_to_write_per_event"]:
        queued_at[key.rsplit(":", 1)[0]].append((end, dur))
    for what in ("stop", "storm"):
        stops(d, what, [b for b in bench if b[0] == what], get, queued_at)

    same: dict[str, list[float]] = defaultdict(list)
    other: dict[str, list[float]] = defaultdict(list)
    for leg, _, rec, recv, tid, seq in bench:
        key = f"{tid}:{seq}"
        st = get("r1", "recorded_to_stored", key)
        if st is None:
            continue
        total = (recv - rec) / 1000
        if "same" in leg:
            same["recorded→recv"].append(total)
            same["stored"].append(st[1])
            same["stored→recv"].append(total - st[1])
        elif "other" in leg:
            x, h = get("r2", "recorded_to_xadd", key), get("r2", "recorded_to_hub", key)
            other["recorded→recv"].append(total)
            if x and h:
                other["publish"].append(x[1] - st[1])
                other["xread"].append(h[1] - x[1])
                other["hub→recv"].append(total - h[1])
    print(f"{d}: relay, same replica")
    for name, xs in same.items():
        print(line(name, xs))
    print(f"{d}: relay, other replica")
    for name, xs in other.items():
        print(line(name, xs))
    for leg in ("pg_apply", "publish", "lookup"):
        if raw[leg]:
            print(line(f"r1 {leg}", [x[2] for x in raw[leg]]))


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for d in sys.argv[1:]:
        report(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
