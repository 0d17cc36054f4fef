"""Summarises CPU profiles for docs/benchmarks.md (called by scripts/bench_profile.sh).

    bench_profile.py perf FILE    `perf script -F comm,tid,ip,sym` output of the dispatcher
    bench_profile.py pyspy FILE   `py-spy record --format raw` output (collapsed stacks)

perf: the share of samples whose stack contains each component (inclusive,
so shares overlap) and the goroutine roots. pyspy: self and inclusive shares
of the event loop's samples, import-time and gRPC's poller thread left out.
"""

from __future__ import annotations

import collections
import re
import sys

#: Components of the dispatcher, by a regular expression on a frame.
COMPONENTS = [
    ("SQLite (modernc sqlite + libc)", r"modernc\.org"),
    ("store writer goroutine", r"internal/store\.\(\*Writer\)"),
    ("  commit", r"\(\*Tx\)\.Commit"),
    ("  statement parse", r"_sqlite3Prepare"),
    ("  B-tree insert", r"_sqlite3BtreeInsert"),
    ("session receive loop (ingest)", r"session\.\(\*slot\)\.recvLoop"),
    ("WatchTask fan-out", r"api\.\(\*Server\)\.follow"),
    ("gRPC HTTP/2 reader", r"handleRawConn|HandleStreams"),
    ("gRPC loopyWriter (socket writes)", r"loopyWriter"),
    ("event log", r"internal/eventlog"),
    ("GC workers", r"gcBgMarkWorker|bgsweep|bgscavenge"),
    ("scheduler (mcall/mstart)", r"^runtime\.mcall|^runtime\.mstart"),
    ("kernel: context switch", r"finish_task_switch"),
]


def perf_samples(path: str) -> list[list[str]]:
    samples: list[list[str]] = []
    cur: list[str] = []
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                if cur:
                    samples.append(cur)
                cur = []
            elif line[0] in " \t":
                parts = line.split(None, 1)
                cur.append(parts[1].strip() if len(parts) > 1 else "?")
            else:
                cur = []
    if cur:
        samples.append(cur)
    return samples


def summarise_perf(path: str) -> None:
    samples = perf_samples(path)
    total = max(len(samples), 1)
    print(f"{len(samples)} samples; share of samples with the component on the stack:")
    for name, pattern in COMPONENTS:
        rx = re.compile(pattern)
        n = sum(1 for s in samples if any(rx.search(f) for f in s))
        print(f"  {n / total:6.1%}  {name}")
    roots: collections.Counter[str] = collections.Counter()
    for s in samples:
        frames = [f for f in s if not f.startswith("runtime.goexit") and f != "[unknown]"]
        roots[frames[-1] if frames else "?"] += 1
    print("goroutine roots:")
    for root, n in roots.most_common(8):
        print(f"  {n / total:6.1%}  {root[:100]}")


def summarise_pyspy(path: str) -> None:
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if "importlib" in stack or "Thread.run" in stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            self_c[frames[-1]] += n
            for frame in set(frames):
                incl[frame] += n
    total = max(total, 1)
    print(f"{total} event-loop samples; self:")
    for frame, n in self_c.most_common(10):
        print(f"  {n / total:6.1%}  {frame}")
    print("inclusive (commander, grpc, anyio, starlette/uvicorn frames):")
    keep = re.compile(r"commander/|grpc/|anyio/|uvicorn/|starlette/|json/")
    for frame, n in [(f, n) for f, n in incl.most_common(200) if keep.search(f)][:14]:
        print(f"  {n / total:6.1%}  {frame}")


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("perf", "pyspy"):
        print(__doc__, file=sys.stderr)
        return 2
    if sys.argv[1] == "perf":
        summarise_perf(sys.argv[2])
    else:
        summarise_pyspy(sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
