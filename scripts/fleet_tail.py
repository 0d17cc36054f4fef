"""Where the fleet relay's tail is, from a BENCH_FLEET_DUMP file.

    BENCH_FLEET_RELAY_ONLY=1 BENCH_FLEET_DUMP=/tmp/d.jsonl .venv/bin/python scripts/bench_fleet.py
    .venv/bin/python scripts/fleet_tail.py /tmp/d.jsonl [more dumps...]

For each dump and each watcher (same / other replica), recorded → received:
- the first content of each task against the rest (a watcher that waits on
  the bus before its task is adopted here would show in the first);
- the slow events (≥ p95): how many have a slow event of another task within
  ±5 ms (one stall of a process on the path hits every task at once);
- the slow events' phase concentration (Rayleigh R, 0 = none, 1 = all at one
  phase) at the fleet's periods (0.5 s health pings, 1 s sweep and
  reconcile, 2.5 s reclaim, 3.33 s lease renewal) and at periods near them
  as controls: a period of the fleet's that holds the tail stands out from
  its neighbours in the mean over several dumps.
"""

from __future__ import annotations

import bisect
import json
import math
import sys
from collections import defaultdict

FLEET_PERIODS = (0.5, 1.0, 2.5, 10 / 3)
CONTROL_PERIODS = (0.45, 0.55, 0.9, 1.1, 2.3, 2.7, 3.0, 3.6)
Row = tuple[str, int, int, int, str, int]


def load(path: str) -> list[Row]:
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f if line.strip()]


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def rayleigh(times_us: list[int], period_s: float) -> float:
    if not times_us:
        return float("nan")
    c = s = 0.0
    for t in times_us:
        a = 2 * math.pi * ((t / 1e6) % period_s) / period_s
        c += math.cos(a)
        s += math.sin(a)
    return math.hypot(c, s) / len(times_us)


def report(path: str, side: str, rows: list[Row]) -> dict[float, float]:
    mine = [r for r in rows if side in r[0]]
    by_task: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for _, _, rec, recv, tid, seq in mine:
        by_task[tid].append((seq, (recv - rec) / 1000))
    first: list[float] = []
    rest: list[float] = []
    for evs in by_task.values():
        evs.sort()
        first.append(evs[0][1])
        rest.extend(lat for _, lat in evs[1:])
    lat = [(recv - rec) / 1000 for _, _, rec, recv, _, _ in mine]
    p95 = quantile(lat, 0.95)
    slow = sorted((rec, tid) for _, _, rec, recv, tid, _ in mine if (recv - rec) / 1000 >= p95)
    at = [t for t, _ in slow]
    shared = 0
    for t, tid in slow:
        i, j = bisect.bisect_left(at, t - 5000), bisect.bisect_right(at, t + 5000)
        shared += any(slow[k][1] != tid for k in range(i, j))
    p50, p99 = quantile(lat, 0.5), quantile(lat, 0.99)
    print(
        f"{path} {side}: n {len(lat)} p50 {p50:.1f} p99 {p99:.1f} ms;"
        f" first content p99 {quantile(first, 0.99):.1f}, the rest p99 {quantile(rest, 0.99):.1f};"
        f" slow (≥ p95 {p95:.1f} ms) {len(slow)}, with another task's within ±5 ms {shared}"
    )
    return {p: rayleigh(at, p) for p in FLEET_PERIODS + CONTROL_PERIODS}


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for side in ("same", "other"):
        per: list[dict[float, float]] = []
        for path in sys.argv[1:]:
            per.append(report(path, side, load(path)))
        periods = sorted(FLEET_PERIODS + CONTROL_PERIODS)
        mean = {p: sum(d[p] for d in per) / len(per) for p in periods}
        print(
            f"{side}: slow events' phase concentration R, mean of {len(per)} (* a fleet period): "
            + ", ".join(
                f"{p:.2f}s{'*' if p in FLEET_PERIODS else ''} {mean[p]:.2f}" for p in periods
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
