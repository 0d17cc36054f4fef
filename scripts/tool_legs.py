"""Joins the two halves of the tool round-trip trace and prints its legs.

Run a tools scenario with both traces on, then join them::

    DISPATCHER_TOOL_TRACE=/tmp/d.txt LOADGEN_TOOL_TRACE=/tmp/l.txt \
        BENCH_ONLY=tools scripts/bench.sh
    python3 scripts/tool_legs.py /tmp/d.txt /tmp/l.txt

(BENCH_ONLY=tools runs tools-burst too and both append to the files: delete
them between runs, or run one label.)

With the socket traces too (DISPATCHER_CONN_TRACE, LOADGEN_CONN_TRACE:
loadgen marks each call's arguments and both processes log when a marked
message crosses their sockets, internal/benchkit/conntrace.go)::

    python3 scripts/tool_legs.py D L DCONN LCONN

it also splits each call into the client's (loadgen) and the server's
(dispatcher) time. On loopback a write's bytes are in the peer's socket when
the write returns, so the peer's read minus that write is the peer's
wake-up, charged to the peer. The dispatcher's lines are written by
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


SOCKET_LEGS = (
    ("client", "c: Send -> socket write"),
    ("server", "s: wake-up (socket -> read)"),
    ("server", "s: read -> toolCall"),
    ("server", "s: toolCall -> Send returned"),
    ("server", "s: Send -> socket write"),
    ("client", "c: wake-up (socket -> read)"),
    ("client", "c: read -> Recv + hand-off"),
    ("server", "s: -> invoke written"),
    ("client", "c: provider wake-up"),
    ("client", "c: provider answers"),
    ("server", "s: provider result wake-up"),
    ("server", "s: read -> result in"),
)

Marks = dict[str, list[tuple[str, int, int]]]


def read_marks(path: str) -> Marks:
    """marker -> [(dir, conn, ns)] in file order."""
    out: Marks = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) == 4:
                out.setdefault(fields[0], []).append((fields[1], int(fields[2]), int(fields[3])))
    return out


def first(
    marks: list[tuple[str, int, int]], d: str, conn: int | None = None
) -> tuple[int, int] | None:
    """The first crossing in direction d (on conn), as (conn, ns)."""
    for dd, c, t in sorted(marks, key=lambda m: m[2]):
        if dd == d and (conn is None or c == conn):
            return c, t
    return None


def both_ways(marks: list[tuple[str, int, int]], not_conn: int) -> int | None:
    """The connection other than not_conn the marker crossed both ways: the
    provider's (a watcher's connection carries it one way only)."""
    ways: dict[int, set[str]] = {}
    for d, c, _ in marks:
        ways.setdefault(c, set()).add(d)
    return next((c for c, w in ways.items() if c != not_conn and len(w) == 2), None)


def socket_legs(
    d: list[int],
    sent: int,
    recv: int,
    got: int,
    dm: list[tuple[str, int, int]],
    lm: list[tuple[str, int, int]],
) -> list[int] | None:
    """The call's SOCKET_LEGS (ns), or None when a crossing is missing. A
    marker is unique to its call, so its first write by loadgen is the call
    and its first read by the dispatcher is the call's arrival."""
    _emitted, received, dispatched, resulted, _pushed, _taken, done = d
    lw = first(lm, "w")
    dr = first(dm, "r")
    if not lw or not dr or not recv:
        return None
    dw = first(dm, "w", conn=dr[0])
    lr = first(lm, "r", conn=lw[0])
    if not dw or not lr:
        return None
    legs = [lw[1] - sent, dr[1] - lw[1], received - dr[1], done - received]
    legs += [dw[1] - done, lr[1] - dw[1], got - lr[1]]
    if resulted == dispatched:  # a built-in
        return [*legs, 0, 0, 0, 0, 0]
    dp, lp = both_ways(dm, dr[0]), both_ways(lm, lw[0])
    if dp is None or lp is None:
        return None
    pw, pr = first(dm, "w", conn=dp), first(lm, "r", conn=lp)
    pa, pd = first(lm, "w", conn=lp), first(dm, "r", conn=dp)
    if not pw or not pr or not pa or not pd:
        return None
    legs += [pw[1] - dispatched, pr[1] - pw[1], pa[1] - pr[1], pd[1] - pa[1], resulted - pd[1]]
    legs[3] -= resulted - dispatched  # the provider's legs, not the dispatcher's work
    return legs


def print_socket_legs(tool: str, calls: list[tuple[int, list[int]]]) -> None:
    totals = sorted(t for t, _ in calls)
    p99 = totals[min(len(totals) - 1, int(len(totals) * 0.99))]
    slow = [legs for t, legs in calls if t >= p99]
    print(f"== {tool}: {len(calls)} calls with every socket crossing (µs)")
    print(f"{'leg':32} {'p50':>8} {'p90':>8} {'p99':>8} {'slowest 1%':>11}")
    for i, (_side, name) in enumerate(SOCKET_LEGS):
        v = [legs[i] for _, legs in calls]
        qs = " ".join(f"{quantile(v, q):8.1f}" for q in (0.5, 0.9, 0.99))
        print(f"{name:32} {qs} {statistics.mean(c[i] for c in slow) / 1e3:11.1f}")
    for side in ("client", "server"):
        idx = [i for i, (s, _) in enumerate(SOCKET_LEGS) if s == side]
        v = [sum(legs[i] for i in idx) for _, legs in calls]
        qs = " ".join(f"{quantile(v, q):8.1f}" for q in (0.5, 0.9, 0.99))
        tail = statistics.mean(sum(c[i] for i in idx) for c in slow) / 1e3
        print(f"{'= ' + side + ' (sum)':32} {qs} {tail:11.1f}")
    v = [t for t, _ in calls]
    qs = " ".join(f"{quantile(v, q):8.1f}" for q in (0.5, 0.9, 0.99))
    print(f"{'= total':32} {qs} {statistics.mean(t for t in v if t >= p99) / 1e3:11.1f}")


def quantile(values: list[int], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] / 1e3


def main() -> None:
    if len(sys.argv) not in (3, 5):
        sys.exit("usage: tool_legs.py D_TRACE L_TRACE [D_CONN_TRACE L_CONN_TRACE]")
    disp = read_dispatcher(sys.argv[1])
    dmarks = read_marks(sys.argv[3]) if len(sys.argv) == 5 else {}
    lmarks = read_marks(sys.argv[4]) if len(sys.argv) == 5 else {}
    rows: dict[str, list[list[int]]] = {}
    sockets: dict[str, list[tuple[int, list[int]]]] = {}
    with open(sys.argv[2]) as f:
        for line in f:
            fields = line.split()
            if len(fields) not in (6, 7) or (fields[0], fields[1]) not in disp:
                continue
            d = disp[(fields[0], fields[1])]
            sent, recv, got = (int(x) for x in fields[3:6])
            legs = legs_of(d, sent, recv, got)
            rows.setdefault(fields[2], []).append(legs)
            if len(fields) == 7 and fields[6] in dmarks and fields[6] in lmarks:
                sl = socket_legs(d, sent, recv, got, dmarks[fields[6]], lmarks[fields[6]])
                if sl is not None:
                    sockets.setdefault(fields[2], []).append((got - sent, sl))
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
    for tool, socket_calls in sockets.items():
        print_socket_legs(tool, socket_calls)


if __name__ == "__main__":
    main()
