"""Summarises CPU profiles for docs/benchmarks.md (called by scripts/bench_profile.sh).

    bench_profile.py perf FILE        `perf script -F comm,tid,ip,sym` output of the dispatcher
    bench_profile.py traces FILE      `go tool pprof -traces` output (CPU or heap profile)
    bench_profile.py goroutines F...  /debug/pprof/goroutine?debug=1 snapshots
    bench_profile.py stoplog FILE     the dispatcher's JSON log: its "stop latency" lines
    bench_profile.py memstats BEFORE AFTER RSS N   runtime.MemStats (heap?debug=1) per slot
    bench_profile.py pyspy FILE       `py-spy record --format raw` output (collapsed stacks)

perf, traces: the share of samples (traces: of the sample value, CPU time or
bytes) whose stack contains each component (inclusive, so shares overlap)
and the goroutine roots. goroutines: where the goroutines of each kind wait,
summed over the snapshots. pyspy: self and inclusive shares
of the event loop's samples, import-time and gRPC's poller thread left out.
"""

from __future__ import annotations

import collections
import json
import math
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
    ("  waiting for store room (Writer.WaitRoom)", r"\(\*Writer\)\.WaitRoom"),
    ("  policy evaluation", r"internal/policy\."),
    ("  protobuf unmarshal", r"proto\.UnmarshalOptions|unmarshalPointer"),
    ("session sender (outbox → Send)", r"session\.\(\*slot\)\.sendLoop"),
    ("tool broker", r"internal/broker\."),
    ("task manager / scheduler", r"internal/task\.|internal/scheduler\."),
    ("unary RPCs (Submit/Cancel/Get...)", r"wrapUnaryHandler|processUnaryRPC"),
    ("WatchTask fan-out", r"api\.\(\*Server\)\.follow"),
    ("gRPC HTTP/2 reader", r"handleRawConn|HandleStreams"),
    ("gRPC loopyWriter (socket writes)", r"loopyWriter"),
    ("event log", r"internal/eventlog"),
    ("GC workers", r"gcBgMarkWorker|bgsweep|bgscavenge"),
    ("gRPC transport buffers (bufio, framer)", r"bufio\.New|newFramer|http2\.NewFramer"),
    ("goroutine stacks (newproc)", r"^runtime\.malg|^runtime\.newproc"),
    ("scheduler (mcall/mstart)", r"^runtime\.mcall|^runtime\.mstart"),
    ("kernel: context switch", r"finish_task_switch"),
]


#: Components of the dispatcher's live heap (traces of an inuse_space profile).
HEAP_COMPONENTS = [
    ("session: slot, outbox, Serve (our per-slot structs)", r"internal/session\."),
    ("  newSlot (incl. its logger's attrs)", r"session\.newSlot"),
    ("  newOutbox", r"session\.newOutbox"),
    ("gRPC stream setup (operateHeaders, contexts, quotas)", r"http2Server\)\.operateHeaders"),
    ("gRPC per-RPC (processRPC / handleStream)", r"grpc\.\(\*Server\)\.(processRPC|handleStream)"),
    ("gRPC stream reads (recvBuffer, message headers)", r"recvBufferReader|recvBuffer\)"),
    ("gRPC connection buffers (bufio, framer)", r"bufio\.New|newFramer|NewFramer|newBufWriter"),
    ("contexts (cancel/deadline)", r"^context\."),
    ("slog (logger clones, buffers)", r"log/slog"),
    ("timers", r"time\.newTimer|time\.AfterFunc"),
    ("goroutine descriptors (malg)", r"^runtime\.malg"),
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


def pprof_traces(path: str) -> tuple[str, list[tuple[float, list[str]]]]:
    """Parses `go tool pprof -traces`: (unit, [(value, frames leaf first)])."""
    unit = ""
    out: list[tuple[float, list[str]]] = []
    value: float | None = None
    frames: list[str] = []
    num = re.compile(r"^\s*([0-9.]+)([a-zA-Z]*)\s+(\S.*)$")
    scale = {
        "ns": 1e-9,
        "us": 1e-6,
        "µs": 1e-6,
        "ms": 1e-3,
        "s": 1.0,
        "min": 60.0,
        "h": 3600.0,
        "B": 1,
        "kB": 1e3,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "": 1,
    }
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("-----------+"):
                if value is not None:
                    out.append((value, frames))
                value, frames = None, []
                continue
            if value is None:
                m = num.match(line)
                if line.startswith("Type:"):
                    unit = "seconds" if "cpu" in line else "bytes"
                elif m and not line.startswith(("File:", "Time:", "Duration:", "Build ID:")):
                    value = float(m.group(1)) * scale.get(m.group(2), 1)
                    frames = [m.group(3).strip()]
            elif line.strip() and not line.strip().startswith("bytes:"):
                frames.append(line.strip())
    if value is not None:
        out.append((value, frames))
    return unit, out


def summarise_traces(path: str) -> None:
    unit, samples = pprof_traces(path)
    total = sum(v for v, _ in samples) or 1.0
    shown = f"{total:.2f} s of CPU" if unit == "seconds" else f"{total / 2**20:.1f} MiB live"
    print(f"{shown} in {len(samples)} stacks; share with the component on the stack:")
    for name, pattern in COMPONENTS if unit == "seconds" else HEAP_COMPONENTS:
        rx = re.compile(pattern)
        v = sum(val for val, s in samples if any(rx.search(f) for f in s))
        if v:
            print(f"  {v / total:6.1%}  {name}")
    roots: dict[str, float] = collections.defaultdict(float)
    for val, s in samples:
        frames = [f for f in s if not f.startswith("runtime.goexit")]
        roots[frames[-1] if frames else "?"] += val
    print("goroutine roots:")
    for root, v in sorted(roots.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {v / total:6.1%}  {root[:100]}")


#: Where a goroutine of the dispatcher waits, by a frame of its stack (first match).
WAITS = [
    ("store writer back-pressure (Writer.WaitRoom)", r"\(\*Writer\)\.WaitRoom"),
    ("reading its stream (recvMsg)", r"\(\*parser\)\.recvMsg|recvBufferReader"),
    ("waiting for the outbox (outbox.next)", r"\(\*outbox\)\.next"),
    ("sending (flow control / loopy)", r"writeQuota|\(\*Stream\)\.Write|serverStream\)\.SendMsg"),
    ("waiting for events (log Read)", r"\(\*memLog\)\.Read"),
    ("waiting for the store (Writer.Flush)", r"\(\*Writer\)\.Flush"),
    ("a lock", r"SemacquireMutex|RWMutex"),
]


def goroutine_snapshots(path: str) -> list[tuple[int, list[str]]]:
    """Parses /debug/pprof/goroutine?debug=1: [(count, frames leaf first)]."""
    out: list[tuple[int, list[str]]] = []
    with open(path, errors="replace") as f:
        count, frames = 0, list[str]()
        for line in f:
            m = re.match(r"^(\d+) @", line)
            if m:
                if count:
                    out.append((count, frames))
                count, frames = int(m.group(1)), []
            elif line.startswith("#\t") and count:
                parts = line.split()
                if len(parts) >= 3:
                    frames.append(parts[2].split("+0x")[0])
        if count:
            out.append((count, frames))
    return out


def summarise_goroutines(paths: list[str]) -> None:
    kinds = [
        ("session receive loops", r"\(\*slot\)\.recvLoop"),
        ("session senders", r"\(\*slot\)\.sendLoop"),
        ("ChatStream handlers (Serve)", r"session\.\(\*Server\)\.Serve$"),
        ("WatchTask followers", r"\(\*Server\)\.follow"),
        ("store writer", r"\(\*Writer\)\.run"),
        ("gRPC transport: readers", r"HandleStreams|\(\*http2Server\)\.operateHeaders|readyreader"),
        ("gRPC transport: loopy writers", r"loopyWriter"),
        ("gRPC transport: keepalive", r"\(\*http2Server\)\.keepalive"),
        ("unary RPC handlers", r"wrapUnaryHandler|processUnaryRPC"),
    ]
    total = 0
    by_kind: collections.Counter[str] = collections.Counter()
    waits: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for path in paths:
        for n, frames in goroutine_snapshots(path):
            total += n
            kind = next((k for k, rx in kinds if any(re.search(rx, f) for f in frames)), "other")
            by_kind[kind] += n
            wait = next((w for w, rx in WAITS if any(re.search(rx, f) for f in frames)), "")
            if not wait:
                wait = "running/other: " + (frames[0].rsplit("/", 1)[-1][:60] if frames else "?")
            waits[kind][wait] += n
    snaps = max(len(paths), 1)
    print(f"{total / snaps:.0f} goroutines per snapshot on average ({len(paths)} snapshots)")
    for kind, n in by_kind.most_common():
        print(f"  {n / snaps:8.1f}  {kind}")
        for wait, m in waits[kind].most_common(4):
            print(f"            {m / n:6.1%}  {wait}")


def summarise_stoplog(path: str) -> None:
    sent: list[float] = []
    acked: list[float] = []
    with open(path, errors="replace") as f:
        for line in f:
            if '"stop latency"' not in line:
                continue
            rec = json.loads(line)
            acked.append(rec["ack_after"] / 1e6)
            if "sent_after" in rec:
                sent.append(rec["sent_after"] / 1e6)

    def pct(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        if not xs:
            return float("nan")
        return xs[max(0, min(len(xs) - 1, math.ceil(p * len(xs)) - 1))]

    for name, xs in (
        ("decision → stop packet handed to gRPC", sent),
        ("decision → stopped handled", acked),
    ):
        print(
            f"  {name:40s} n={len(xs)} p50={pct(xs, 0.5):.2f} ms p90={pct(xs, 0.9):.2f} ms "
            f"p99={pct(xs, 0.99):.2f} ms max={max(xs, default=float('nan')):.2f} ms"
        )


def memstats(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path, errors="replace") as f:
        for line in f:
            # "# HeapInuse = 123" or "# Stack = inuse / sys"
            m = re.match(r"^# (\w+) = (\d+)(?: / \d+)?$", line.strip())
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def summarise_memstats(before: str, after: str, rss_file: str, n: int) -> None:
    a, b = memstats(before), memstats(after)
    with open(rss_file) as f:
        rss_kib = int(f.read().split()[1])
    print(
        f"RSS {rss_kib / 1024:.1f} MiB = {rss_kib / n:.1f} KiB per slot (incl. the empty process)"
    )
    print("runtime.MemStats, growth per slot from the empty dispatcher:")
    for key, what in (
        ("HeapInuse", "heap in use (objects, incl. gRPC buffers)"),
        ("Stack", "goroutine stacks (in use)"),
        ("Sys", "all memory obtained from the OS"),
        ("HeapIdle", "heap idle (not yet returned)"),
    ):
        if key in b:
            d = b[key] - a.get(key, 0)
            print(f"  {key:10s} {b[key] / 2**20:8.1f} MiB  {d / n / 1024:6.1f} KiB/slot  {what}")


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
    mode, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 2 else ("", [])
    if mode == "perf" and len(args) == 1:
        summarise_perf(args[0])
    elif mode == "pyspy" and len(args) == 1:
        summarise_pyspy(args[0])
    elif mode == "traces" and len(args) == 1:
        summarise_traces(args[0])
    elif mode == "goroutines" and args:
        summarise_goroutines(args)
    elif mode == "stoplog" and len(args) == 1:
        summarise_stoplog(args[0])
    elif mode == "memstats" and len(args) == 4:
        summarise_memstats(args[0], args[1], args[2], int(args[3]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
