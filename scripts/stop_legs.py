#!/usr/bin/env python3
"""The stop's legs: joins DISPATCHER_STOP_TRACE and LOADGEN_STOP_TRACE.

    scripts/stop_legs.py DISPATCHER_TRACE LOADGEN_TRACE [WIRE]
    scripts/stop_legs.py - LOADGEN_TRACE WIRE

Both files hold Unix nanoseconds of one host (see
internal/session/stoptrace.go and cmd/loadgen/commander.go). Prints each
leg's p50 / p90 / p99 (ms) over all stops, then the slowest 1 % of stops
(by decision → stopped received, the bench's `stop` row) split in the same
legs (mean per leg, and how often each leg was the largest).

The dispatcher's "queued" stamp is taken just before setStop puts the stop
in the stop lane, so the leg after it includes setStop; the task's record
with the stop is queued after setStop (no stamp).

WIRE, if given, holds lines "NS stop|stopped SESSION [user]": when each
stop and stopped crossed the loopback interface (kernel timestamps of a
packet capture; the bench's stopcap tool; "user" marks a row without one,
stamped by stopcap after the packet, and such rows are counted). The
transport legs are then split at the wire into the sending and the
receiving process's parts. With "-" for
DISPATCHER_TRACE (a dispatcher that writes none, e.g. main's binary) the
dispatcher's side is the stop and stopped events' times loadgen's watcher
got ("# events" lines) and the wire: decision → on the wire, wire → handled.
"""

from __future__ import annotations

import sys
from collections import Counter

LEGS = [
    ("decided → fenced (fence event appended)", "decided", "fenced"),
    ("fenced → context cancelled", "fenced", "queued"),
    ("setStop (stop lane) → sender took it", "queued", "taken"),
    ("sender: grpc Send", "taken", "sent"),
    ("Send → commander's Recv (loopy, wire, reader)", "sent", "c_received"),
    ("commander: Recv → session goroutine", "c_received", "c_seen"),
    ("commander: leaked packets sent", "c_seen", "c_sending"),
    ("commander: Send(stopped)", "c_sending", "c_sent"),
    ("commander's Send → dispatcher handles stopped", "c_sent", "received"),
    ("dispatcher: stopped handled → recorded", "received", "recorded"),
]
WIRE_LEGS = [
    ("  dispatcher: Send → stop on the wire (grpc writer)", "sent", "w_stop"),
    ("  commander: wire → Recv (reader, receiving goroutine)", "w_stop", "c_received"),
    ("  commander: Send(stopped) → on the wire (grpc writer)", "c_sending", "w_stopped"),
    ("  dispatcher: wire → stopped handled (reader, receive loop)", "w_stopped", "received"),
]
TOTAL = ("decided → stopped received (the bench row)", "decided", "received")
EVENT_LEGS = [
    ("dispatcher: decision → stop on the wire", "decided", "w_stop"),
    ("commander: wire → Recv (reader, receiving goroutine)", "w_stop", "c_received"),
    ("commander: Recv → Send(stopped) (session goroutine, leaks)", "c_received", "c_sending"),
    ("commander: Send(stopped) → on the wire (grpc writer)", "c_sending", "w_stopped"),
    ("dispatcher: wire → stopped handled (reader, receive loop)", "w_stopped", "received"),
]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    rows: dict[str, dict[str, int]] = {}
    sched: dict[str, list[list[int]]] = {"dispatcher": [], "loadgen": []}
    d_names = ["decided", "fenced", "queued", "taken", "sent", "received", "recorded"]
    c_names = ["c_received", "c_seen", "c_sending", "c_sent"]
    events_only = argv[1] == "-"
    with open("/dev/null" if events_only else argv[1]) as f:
        for line in f:
            parts = line.split()
            if line.startswith("# sched "):
                sched["dispatcher"].append([int(x) for x in parts[2:]])
            if len(parts) != 8 or line.startswith("#"):
                continue
            rows.setdefault(parts[0], {}).update(zip(d_names, map(int, parts[1:]), strict=True))
    with open(argv[2]) as f:
        for line in f:
            parts = line.split()
            if line.startswith("# sched "):
                sched["loadgen"].append([int(x) for x in parts[2:]])
            if line.startswith("# events ") and events_only:
                rows.setdefault(parts[2], {}).update(decided=int(parts[3]), received=int(parts[4]))
            if len(parts) != 5 or line.startswith("#"):
                continue
            rows.setdefault(parts[0], {}).update(zip(c_names, map(int, parts[1:]), strict=True))
    legs = list(LEGS)
    user_stamped = 0
    if len(argv) == 4:
        with open(argv[3]) as f:
            for line in f:
                ns, kind, sid, *mark = line.split()
                if sid in rows and "w_" + kind not in rows[sid]:
                    rows[sid]["w_" + kind] = int(ns)
                    user_stamped += mark == ["user"]
        legs += WIRE_LEGS
        d_names = [*d_names, "w_stop", "w_stopped"]
    if events_only:
        legs = list(EVENT_LEGS)
        d_names = ["decided", "received", "w_stop", "w_stopped"]
    full = [
        r for r in rows.values() if len(r) == len(d_names) + len(c_names) and r.get("taken", 1) > 0
    ]
    print(
        f"stops joined: {len(full)} (dispatcher lines {sum('decided' in r for r in rows.values())})"
    )
    if user_stamped:
        print(f"wire rows without a kernel timestamp (stamped later by stopcap): {user_stamped}")
    if not full:
        return 0
    width = max(len(n) for n, _, _ in [*legs, TOTAL])
    print(f"{'leg':<{width}}  p50 ms  p90 ms  p99 ms   max ms")
    for name, a, b in [*legs, TOTAL]:
        v = [(r[b] - r[a]) / 1e6 for r in full]
        p50, p90, p99 = pct(v, 50), pct(v, 90), pct(v, 99)
        print(f"{name:<{width}}  {p50:6.3f}  {p90:6.3f}  {p99:6.3f}  {max(v):7.3f}")
    totals = sorted(full, key=lambda r: r[TOTAL[2]] - r[TOTAL[1]])
    slow = totals[-max(1, len(totals) // 100) :]
    floor = (slow[0]["received"] - slow[0]["decided"]) / 1e6
    print(f"\nthe slowest {len(slow)} stops (total ≥ {floor:.3f} ms):")
    largest: Counter[str] = Counter()
    for r in slow:
        largest[max(legs, key=lambda leg: r[leg[2]] - r[leg[1]])[0]] += 1
    for name, a, b in legs:
        v = [(r[b] - r[a]) / 1e6 for r in slow]
        print(f"{name:<{width}}  mean {sum(v) / len(v):6.3f} ms  largest in {largest[name]}")
    print(
        "\nGo scheduler latency (runnable → running), per 1 s window, median / worst window (ms):"
    )
    for proc, wins in sched.items():
        if not wins:
            continue
        cols = list(zip(*wins, strict=True))
        fields = ", ".join(
            f"{name} {pct([c / 1e6 for c in col], 50):.3f} / {max(col) / 1e6:.3f}"
            for name, col in zip(["p50", "p99", "p99.9", "max"], cols[1:], strict=True)
        )
        print(f"  {proc}: {len(wins)} windows, {fields}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
