"""Issue 13: the fleet (three replicas, PostgreSQL, Redis) against one dispatcher.

Called by scripts/bench.sh (``python_driver fleet bench_fleet.py``), which hands
it a fresh single-node dispatcher (SQLite, the default store): that one is the
baseline of part 4. Everything else this driver starts itself, with state in a
temporary directory of its own (scripts/postgres.sh with its own PG_STATE_DIR,
scripts/redis.sh with its own REDIS_STATE_DIR, so it never meets another run):

1. relay: SESSIONS streaming sessions of the real Python commander against the
   scripted model (bin/scriptedllm, RATE tokens/s each). The commander is given
   the three replicas' addresses and its slots sit on r1 (its first). Each task
   has a watcher on r1 (the replica that runs the session) and one on r2:
   commander emit (``emitted_at_us``) -> watcher receives, same vs other replica.
2. cancel: each lane cancels its task 1-3 s after its first content with
   CancelTask on r3 and submits the next one; CancelTask sent (client clock) ->
   ``stopped`` recorded by r1 (its event time) and -> ``stopped`` received by
   the watcher on r2. One machine, one clock.
2b. cancel storm: then STORM tasks (BENCH_FLEET_STORM, default SESSIONS: every
   slot) streaming on r1, cancelled all at once with CancelTask on r3: the same
   two latencies, in rows of their own (the rows of part 2 stay storm-free).
3. hand-over: SESSIONS new sessions on r1; kill -9 of r1 -> the commander
   re-attaches each to another replica; kill -> the ``re-attached`` event
   recorded again (and -> first content again), over the sessions of r1. r1
   is started again; then the same with SIGTERM of the replica that now holds
   the sessions. Watchers (on the replicas not killed) resume by seq.
4. events/s under flood (bin/loadgen --scenario throughput, 64-byte packets,
   one watcher per task): the SQLite single node and a postgres single node
   first; the three replicas at once last (r2 started again, no commander),
   one loadgen per replica with a third of the sessions each; with the CPU
   time per process (from /proc) over the window and a CPU profile of r1.

Result lines in loadgen's ``--json`` shape go to $BENCH_RESULTS; logs beside it.
BENCH_QUICK=1: 16 sessions, shorter phases.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
from _benchlib import (
    ADDR,
    CLIENT_TOKEN,
    COMMANDER_TOKEN,
    QUICK,
    arg_parser,
    check,
    cpu_seconds,
    latency_summary,
    make_result,
    md,
    stop_process,
    value,
    wait_for_slots,
    write_result,
)

from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"
SESSIONS = int(os.environ.get("BENCH_FLEET_SESSIONS", "16" if QUICK else "64"))
#: Model tokens/s per session. 2.5 x 64 sessions = 160 content events/s through
#: the one Python commander: at 10/s (640/s) it and this driver saturated the two
#: shared cores and the latencies measured the machine, not the fleet.
RATE = float(os.environ.get("BENCH_FLEET_RATE", "2.5"))
RELAY_SECONDS = float(os.environ.get("BENCH_FLEET_RELAY_SECONDS", "10" if QUICK else "30"))
#: Tasks of the cancel storm (part 2b): all cancelled at once; at most SESSIONS
#: (the commander's slots), by default every one of them.
STORM = min(SESSIONS, int(os.environ.get("BENCH_FLEET_STORM", str(SESSIONS))))
WARMUP = 3.0
FLOOD_SECONDS = 6 if QUICK else 15
FLOOD_SESSIONS = 6
TERMINAL = (agent_pb2.SUCCESS, agent_pb2.FAILURE, agent_pb2.CANCELLED)
OUT = Path(os.environ.get("BENCH_RESULTS", "/tmp/x")).parent
#: The replicas' binary (default bin/dispatcher): to compare two builds (A/B).
DISPATCHER_BIN = os.environ.get("BENCH_FLEET_DISPATCHER", str(BIN / "dispatcher"))
#: BENCH_FLEET_RELAY_ONLY=1: only part 1+2 (relay + cancel), for A/B runs of the
#: latency goals (~1 min); no single-node baseline is needed.
RELAY_ONLY = os.environ.get("BENCH_FLEET_RELAY_ONLY", "") == "1"
#: With RELAY_ONLY: BENCH_FLEET_SINGLE=1 runs the same phase against one
#: dispatcher on PostgreSQL without Redis (submit, both watchers and the cancel
#: on it): the floor the fleet's cross-replica hops add to.
SINGLE = os.environ.get("BENCH_FLEET_SINGLE", "") == "1"
#: PostgreSQL with a deployment's durability (scripts/postgres.sh PG_DURABLE=1:
#: fsync, synchronous_commit and full_page_writes on): a watcher is only ever
#: sent an event that is on disk, so the latencies measured are a fleet's.
#: BENCH_FLEET_PG_DURABLE=0: the test cluster's settings (fsync off), to see
#: what the disk costs.
PG_DURABLE = os.environ.get("BENCH_FLEET_PG_DURABLE", "1")
#: Per-leg latencies of the relay phase (ms), from the events' own times: the
#: commander's emitted_at_us, the event time r1 stamps when it records it, and
#: the watcher's receive time. One machine, one clock.
LEGS: dict[str, list[float]] = {
    "emit → recorded (commander → r1)": [],
    "recorded → watcher, same replica": [],
    "recorded → watcher, other replica": [],
}
META = md(CLIENT_TOKEN)
#: BENCH_FLEET_DUMP=PATH (with RELAY_ONLY): every relay sample of the measured
#: window, raw, to PATH as JSON lines [leg, emitted_at_us, recorded_us,
#: received_us, task_id, seq] (scripts/fleet_tail.py reads them: are the slow
#: events of one task or of all at once, and do they follow a fleet period).
DUMP_PATH = os.environ.get("BENCH_FLEET_DUMP", "")
DUMP: list[tuple[str, int, int, int, str, int]] = []


def log(msg: str) -> None:
    print(f"[fleet] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ts_us(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


def kind(ev: tasks_pb2.TaskEvent) -> str:
    return str(ev.WhichOneof("kind"))


def wait_addr(path: Path, proc: subprocess.Popen[bytes], what: str, secs: float = 30) -> str:
    deadline = time.monotonic() + secs
    while not (path.exists() and path.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (see {OUT})")
        time.sleep(0.05)
    return path.read_text().split()[0]


class Engines:
    """PostgreSQL and Redis of this run only."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
        self.dir.chmod(0o755)
        self.env = {
            **os.environ,
            "PG_STATE_DIR": str(self.dir / "pg"),
            "REDIS_STATE_DIR": str(self.dir / "redis"),
            "PG_DURABLE": PG_DURABLE,
        }
        self.dsn = self._run("postgres.sh", "start")
        self.redis = self._run("redis.sh", "start")

    def _run(self, script: str, cmd: str) -> str:
        return subprocess.run(
            [str(ROOT / "scripts" / script), cmd],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.strip()

    def pids(self) -> dict[str, list[int]]:
        """The postgres processes (the postmaster and its children) and redis-server."""
        out: dict[str, list[int]] = {"postgres": [], "redis": []}
        try:
            master = int((self.dir / "pg" / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            master = 0
        if master:
            out["postgres"] = [master, *children(master)]
        try:
            out["redis"] = [int((self.dir / "redis" / "pid").read_text().strip())]
        except (OSError, ValueError):
            pass
        return out

    def close(self) -> None:
        for script in ("redis.sh", "postgres.sh"):
            subprocess.run(
                [str(ROOT / "scripts" / script), "stop"],
                env=self.env,
                check=False,
                timeout=60,
                capture_output=True,
            )
        shutil.rmtree(self.dir, ignore_errors=True)


def children(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            out.append(int(d))
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / 100, sum(vals) / 100


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += cpu_seconds(p)
        except (OSError, ValueError, IndexError):
            pass
    return total


def late_cpu(groups: dict[str, list[int]], now: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds of the processes of each group in `now` that were not in
    `groups` when a window began: PostgreSQL starts a backend per pooled
    connection, and the replicas open theirs as needed, so backends started
    during a window did all their work in it (left out, their CPU showed
    as "other processes on the machine")."""
    return {k: cpu_of([p for p in v if p not in groups.get(k, [])]) for k, v in now.items()}


class Replica:
    def __init__(self, n: int, eng: Engines, port: int | None = None, fleet: bool = True) -> None:
        self.n, self.eng, self.fleet = n, eng, fleet
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.pprof = f"127.0.0.1:{free_port()}"
        self.start()

    def start(self) -> None:
        addr_file = OUT / f"fleet-r{self.n}.addr"
        addr_file.unlink(missing_ok=True)
        argv = [
            DISPATCHER_BIN,
            "--listen",
            self.addr,
            "--addr-file",
            str(addr_file),
            "--http-listen",
            "",
            "--data-dir",
            str(self.eng.dir / f"data-r{self.n}"),
            "--queue-size",
            "100000",
            "--storage-backend",
            "postgres",
            "--postgres-dsn",
            self.eng.dsn,
            "--pprof-listen",
            self.pprof,
        ]
        if self.fleet:
            argv += [
                "--fleet-redis",
                self.eng.redis,
                "--replica-id",
                f"r{self.n}-{uuid.uuid4().hex[:4]}",
            ]
        if COMMANDER_TOKEN:
            argv += ["--commander-token", COMMANDER_TOKEN]
        if CLIENT_TOKEN:
            argv += ["--client-token", CLIENT_TOKEN]
        with open(OUT / f"fleet-r{self.n}.log", "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        wait_addr(addr_file, self.proc, f"replica r{self.n}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, timeout=20)


# --- parts 1 and 2: relay and cancel ---------------------------------------------------

#: SubmitTask calls refused with UNAVAILABLE and retried (a replica that finds its
#: bus unreachable refuses new tasks until it is back).
SUBMIT_RETRIES = [0]


async def submit(stub: tasks_pb2_grpc.TaskServiceStub, instruction: str) -> str:
    """SubmitTask (planner chat); UNAVAILABLE is retried for up to 15 s, counted."""
    req = tasks_pb2.SubmitTaskRequest(instruction=instruction, planner="chat")
    deadline = time.monotonic() + 15
    while True:
        try:
            return str((await stub.SubmitTask(req, metadata=META)).task_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            SUBMIT_RETRIES[0] += 1
            await asyncio.sleep(0.2)


async def watch(
    stub: tasks_pb2_grpc.TaskServiceStub,
    tid: str,
    relay: list[float],
    since: float,
    first_content: asyncio.Event | None = None,
    stopped: dict[str, Any] | None = None,
    leg: str = "",
) -> None:
    async for resp in stub.WatchTask(tasks_pb2.WatchTaskRequest(task_id=tid), metadata=META):
        now_us = time.time_ns() // 1000
        e = resp.event
        k = kind(e)
        if k == "content":
            if first_content is not None:
                first_content.set()
            if e.emitted_at_us and now_us / 1e6 >= since:
                relay.append((now_us - e.emitted_at_us) / 1000)
                rec_us = ts_us(e.time)
                if DUMP_PATH:
                    DUMP.append((leg, e.emitted_at_us, rec_us, now_us, tid, e.seq))
                if leg:
                    LEGS[leg].append((now_us - rec_us) / 1000)
                if first_content is not None:  # once per event: the other-replica watcher
                    LEGS["emit → recorded (commander → r1)"].append(
                        (rec_us - e.emitted_at_us) / 1000
                    )
        elif k == "stopped" and stopped is not None:
            stopped["recv_us"] = now_us
            stopped["recorded_us"] = ts_us(e.time)
        elif k == "state" and e.state.status in TERMINAL:
            return


async def relay_and_cancel(stubs: list[tasks_pb2_grpc.TaskServiceStub]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "same": [],
        "other": [],
        "recorded": [],
        "seen": [],
        "rec_to_seen": [],
        "tasks": 0,
        "no_stopped": 0,
        "errors": 0,
    }
    t_start = time.time()
    since = t_start + WARMUP
    end = time.monotonic() + RELAY_SECONDS

    async def lane(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            n += 1
            tid = await submit(stubs[0], f"fleet relay {i}.{n}")
            out["tasks"] += 1
            first = asyncio.Event()
            stopped: dict[str, Any] = {}
            w_same = asyncio.create_task(
                watch(stubs[0], tid, out["same"], since, leg="recorded → watcher, same replica")
            )
            w_other = asyncio.create_task(
                watch(
                    stubs[1],
                    tid,
                    out["other"],
                    since,
                    first,
                    stopped,
                    leg="recorded → watcher, other replica",
                )
            )
            try:
                await asyncio.wait_for(first.wait(), 30)
                # The whole draw, also past the phase's end (no task is
                # submitted after it). Cut to the time left, every lane's
                # last task was cancelled the moment its first content came
                # at the end: one storm of SESSIONS cancels that made the
                # stop's p90 and p99 (16 of ~80 samples quick, ~64 of ~700
                # full), not cancels 1-3 s after the first content.
                await asyncio.sleep(random.uniform(1.0, 3.0))
                t0_us = time.time_ns() // 1000
                await stubs[2].CancelTask(
                    tasks_pb2.CancelTaskRequest(task_id=tid, reason="bench"), metadata=META
                )
                await asyncio.wait_for(asyncio.gather(w_same, w_other), 30)
                if stopped and DUMP_PATH:
                    DUMP.append(("stop", t0_us, stopped["recorded_us"], stopped["recv_us"], tid, 0))
                if stopped:
                    out["recorded"].append((stopped["recorded_us"] - t0_us) / 1000)
                    out["seen"].append((stopped["recv_us"] - t0_us) / 1000)
                    out["rec_to_seen"].append((stopped["recv_us"] - stopped["recorded_us"]) / 1000)
                else:
                    out["no_stopped"] += 1
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                out["errors"] += 1
                log(f"lane {i}: {type(exc).__name__}: {exc}")
                w_same.cancel()
                w_other.cancel()

    await asyncio.gather(*(lane(i) for i in range(SESSIONS)))
    return out


async def cancel_storm(stubs: list[tasks_pb2_grpc.TaskServiceStub]) -> dict[str, Any]:
    """Part 2b, after the relay phase (whose stop rows stay storm-free): STORM
    tasks on r1, each streaming with a watcher on r2, cancelled all at once
    with CancelTask on r3 (the calls issued together, each timed from its own
    send): -> ``stopped`` recorded (r1) and -> seen by the watcher on r2."""
    out: dict[str, Any] = {"tasks": STORM, "recorded": [], "seen": [], "no_stopped": 0, "errors": 0}
    ids = [await submit(stubs[0], f"fleet cancel storm {i}") for i in range(STORM)]
    firsts = [asyncio.Event() for _ in ids]
    stops: list[dict[str, Any]] = [{} for _ in ids]
    ignored: list[float] = []
    watchers = [
        asyncio.create_task(watch(stubs[1], t, ignored, float("inf"), f, st))
        for t, f, st in zip(ids, firsts, stops, strict=True)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
    except TimeoutError:
        out["errors"] += sum(not f.is_set() for f in firsts)
        log(f"cancel storm: {out['errors']} of {STORM} tasks never streamed")
    # Every session streaming for a moment, then the storm.
    await asyncio.sleep(1.0)
    sent: list[int] = [0] * len(ids)

    async def cancel(i: int) -> None:
        sent[i] = time.time_ns() // 1000
        await stubs[2].CancelTask(
            tasks_pb2.CancelTaskRequest(task_id=ids[i], reason="bench storm"), metadata=META
        )

    res = await asyncio.gather(*(cancel(i) for i in range(len(ids))), return_exceptions=True)
    for r in res:
        if isinstance(r, BaseException):
            out["errors"] += 1
            log(f"cancel storm: CancelTask: {r}")
    done, pending = await asyncio.wait(watchers, timeout=30)
    for w in pending:
        w.cancel()
    for w in done:
        if (exc := w.exception()) is not None:
            out["errors"] += 1
            log(f"cancel storm: watcher: {exc}")
    for t0_us, st, tid in zip(sent, stops, ids, strict=True):
        if st and DUMP_PATH:
            DUMP.append(("storm", t0_us, st["recorded_us"], st["recv_us"], tid, 0))
        if st:
            out["recorded"].append((st["recorded_us"] - t0_us) / 1000)
            out["seen"].append((st["recv_us"] - t0_us) / 1000)
        else:
            out["no_stopped"] += 1
    out["spread_ms"] = (max(sent) - min(sent)) / 1000 if sent else 0.0
    log(
        f"cancel storm: {STORM} cancels sent within {out['spread_ms']:.1f} ms; "
        f"{out['no_stopped']} without stopped, {out['errors']} errors"
    )
    return out


def storm_rows(storm: dict[str, Any]) -> list[dict[str, Any]]:
    """The cancel storm's two latency rows, named apart from the relay's."""
    n = storm["tasks"]
    return [
        {
            "name": f"cancel storm ({n} at once): CancelTask on r3 → stopped recorded (r1)",
            "summary": latency_summary(storm["recorded"]),
        },
        {
            "name": f"cancel storm ({n} at once): CancelTask on r3 → stopped seen on r2",
            "summary": latency_summary(storm["seen"]),
        },
    ]


def storm_check(storm: dict[str, Any]) -> dict[str, Any]:
    return check(
        "every cancel storm task stopped",
        storm["no_stopped"] == 0 and storm["errors"] == 0,
        f"{storm['tasks']} tasks, {storm['no_stopped']} without stopped, "
        f"{storm['errors']} errors; sent within {storm['spread_ms']:.1f} ms",
    )


# --- part 3: hand-over ---------------------------------------------------------------


class FleetWatch:
    """WatchTask that reconnects to the next of addrs and resumes by seq when its
    stream breaks, until the task's terminal event."""

    def __init__(self, chans: list[grpc.aio.Channel], tid: str) -> None:
        self.chans, self.tid = chans, tid
        self.events: list[tasks_pb2.TaskEvent] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            stub = tasks_pb2_grpc.TaskServiceStub(self.chans[i % len(self.chans)])
            after = self.events[-1].seq if self.events else 0
            req = tasks_pb2.WatchTaskRequest(task_id=self.tid, after_seq=after)
            try:
                async for resp in stub.WatchTask(req, metadata=META):
                    self.events.append(resp.event)
                    ev = resp.event
                    if kind(ev) == "state" and ev.state.status in TERMINAL:
                        return
            except grpc.aio.AioRpcError:
                pass
            i += 1
            await asyncio.sleep(0.05)

    def contents(self) -> int:
        return sum(kind(e) == "content" for e in self.events)

    def handover(self, t_kill_us: int) -> tuple[float, float] | None:
        """(kill -> re-attached recorded, kill -> first content after it) in ms."""
        for j, e in enumerate(self.events):
            if (
                kind(e) == "state"
                and "re-attached" in e.state.message
                and ts_us(e.time) > t_kill_us
            ):
                back = (ts_us(e.time) - t_kill_us) / 1000
                for f in self.events[j + 1 :]:
                    if kind(f) == "content":
                        return back, (ts_us(f.time) - t_kill_us) / 1000
                return back, float("nan")
        return None


async def wait_cond(pred: Any, secs: float) -> bool:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return bool(pred())


async def one_handover(
    how: str,
    victim: Replica,
    submit_ch: grpc.aio.Channel,
    watch_chs: list[grpc.aio.Channel],
    cancel_ch: grpc.aio.Channel,
) -> dict[str, Any]:
    stub = tasks_pb2_grpc.TaskServiceStub(submit_ch)
    ids = []
    for i in range(SESSIONS):
        ids.append(await submit(stub, f"fleet {how} {i}"))
    ws = [FleetWatch(watch_chs[i % 2 :] + watch_chs[: i % 2], t) for i, t in enumerate(ids)]
    flowing = await wait_cond(lambda: all(w.contents() >= 3 for w in ws), 60)
    t_kill_us = time.time_ns() // 1000
    if how == "kill -9":
        victim.proc.kill()
    else:
        victim.proc.send_signal(signal.SIGTERM)
    # The sessions of the victim re-attach within seconds; the others never do.
    await asyncio.sleep(2)
    await wait_cond(
        lambda: all(w.handover(t_kill_us) is not None for w in ws),
        8,
    )
    got = [h for w in ws if (h := w.handover(t_kill_us)) is not None]
    # Every task still streams, wherever it is now: nothing was lost.
    mark = [w.contents() for w in ws]
    still = await wait_cond(
        lambda: all(w.contents() > m for w, m in zip(ws, mark, strict=True)), 15
    )
    cstub = tasks_pb2_grpc.TaskServiceStub(cancel_ch)
    for t in ids:
        await cstub.CancelTask(
            tasks_pb2.CancelTaskRequest(task_id=t, reason="bench"), metadata=META
        )
    await asyncio.wait([w.task for w in ws], timeout=30)
    failed = sum(
        1
        for w in ws
        if not (
            w.events
            and kind(w.events[-1]) == "state"
            and w.events[-1].state.status == agent_pb2.CANCELLED
        )
    )
    for w in ws:
        w.task.cancel()
    return {
        "flowing": flowing,
        "moved": len(got),
        "back": [b for b, _ in got],
        "content_back": [c for _, c in got if c == c],
        "still_streaming": still,
        "not_cancelled": failed,
    }


# --- part 4: flood ---------------------------------------------------------------------


def loadgen(addr: str, sessions: int, label: str, pid: int) -> subprocess.Popen[bytes]:
    argv = [
        str(BIN / "loadgen"),
        "--addr",
        addr,
        "--token",
        COMMANDER_TOKEN,
        "--client-token",
        CLIENT_TOKEN,
        "--scenario",
        "throughput",
        "--sessions",
        str(sessions),
        "--duration",
        f"{FLOOD_SECONDS}s",
        "--warmup",
        "2s",
        "--packet-bytes",
        "64",
        "--streams-per-conn",
        "2",
        "--dispatcher-pid",
        str(pid),
        "--label",
        label,
        "--json",
    ]
    with open(OUT / f"{label}.log", "wb") as logf:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf)


def flood(
    targets: list[tuple[str, int]], label: str, groups: dict[str, list[int]], pprof: str = ""
) -> dict[str, Any]:
    """One loadgen per target at once (FLOOD_SESSIONS split over them); the events
    logged per second summed, and the CPU seconds of each group of processes
    (and of the machine) over the measured window."""
    per = FLOOD_SESSIONS // len(targets)
    procs = [
        loadgen(a, per, f"{label}-{i}" if len(targets) > 1 else label, p)
        for i, (a, p) in enumerate(targets)
    ]
    groups = {**groups, "loadgen": [p.pid for p in procs]}
    time.sleep(2)
    a = {k: cpu_of(v) for k, v in groups.items()}
    ma, t_a = machine_busy(), time.monotonic()
    prof = None
    if pprof:  # a CPU profile of one replica over the window
        url = f"http://{pprof}/debug/pprof/profile?seconds={FLOOD_SECONDS - 3}"
        prof = threading.Thread(target=fetch, args=(url, OUT / f"{label}-r1.pprof"), daemon=True)
        prof.start()
    time.sleep(FLOOD_SECONDS - 2)
    b = {k: cpu_of(v) for k, v in groups.items()}
    mb, t_b = machine_busy(), time.monotonic()
    if prof is not None:
        prof.join(30)
    results = []
    for p in procs:
        stdout, _ = p.communicate(timeout=180)
        for line in stdout.decode().splitlines():
            if line.startswith("{"):
                results.append(json.loads(line))
    wall = t_b - t_a
    split = {k: (b[k] - a[k]) / wall for k in groups}
    ours = sum(split.values())
    machine = (mb[0] - ma[0]) / wall
    split["other processes on the machine"] = max(0.0, machine - ours)

    def val(r: dict[str, Any], name: str) -> float:
        return float(next((v["value"] for v in r.get("values", []) if v["name"] == name), 0.0))

    logged = sum(val(r, "events logged by the dispatcher") for r in results)
    server = sum(
        v for k, v in split.items() if k not in ("loadgen", "other processes on the machine")
    )
    delivered = sum(val(r, "events delivered to watchers") for r in results)
    return {
        "logged": logged,
        "delivered": delivered,
        "split": split,
        "per_server_cpu_s": logged / server if server > 0 else 0.0,
        "machine_cores": (mb[1] - ma[1]) / wall,
        "runs": len(results),
        "want": len(targets),
    }


# --- main ------------------------------------------------------------------------------


def fetch(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            dest.write_bytes(resp.read())
    except OSError as exc:
        log(f"pprof {url}: {exc}")


def pprof_top(path: Path) -> list[str]:
    """Where a replica's CPU goes: of its profile (go tool pprof -top -cum), the
    Duration line and the cumulative share of the dispatcher's own functions,
    the store's pgx transactions, Redis and the garbage collector."""
    if not path.exists():
        return []
    argv = ["go", "tool", "pprof", "-top", "-cum", "-nodecount", "150"]
    got = subprocess.run(
        [*argv, str(BIN / "dispatcher"), str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    prefix = "github.com/agentdispatch/dispatcher/internal/"
    keep = ("gcBgMarkWorker", "pgx/v5.BeginFunc", "go-redis", "runtime.mallocgc")
    out = []
    for line in got.stdout.splitlines():
        if line.startswith("Duration:"):
            out.append(line)
            continue
        cols = line.split(None, 5)
        if (
            len(cols) == 6
            and cols[3].endswith("s")
            and (cols[5].startswith(prefix) or any(k in cols[5] for k in keep))
        ):
            out.append(f"{cols[4]:>7} cum  {cols[5].replace(prefix, '')}")
    return out[:26]


def report_split(name: str, f: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {v * 100:.0f}%" for k, v in f["split"].items())
    return (
        f"{name}: {f['logged']:.0f} events logged/s, {f['delivered']:.0f} delivered/s, "
        f"{f['per_server_cpu_s']:.0f} per server CPU-second; "
        f"CPU (% of one core): {parts}"
    )


def start_scriptedllm() -> subprocess.Popen[bytes]:
    """The scripted model at RATE tokens/s; its address goes to
    OUT/fleet-scriptedllm.addr (wait_addr reads it)."""
    addr_file = OUT / "fleet-scriptedllm.addr"
    addr_file.unlink(missing_ok=True)
    with open(OUT / "fleet-scriptedllm.log", "wb") as logf:
        return subprocess.Popen(
            [
                str(BIN / "scriptedllm"),
                "--listen",
                "127.0.0.1:0",
                "--addr-file",
                str(addr_file),
                "--tokens-per-sec",
                str(RATE),
                "--tokens",
                "100000",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )


def start_commander(reps: list[Replica], llm_url: str) -> subprocess.Popen[bytes]:
    """The real commander, SESSIONS slots, given every replica's address (r1 first)."""
    env = dict(os.environ, LLM_BASE_URL=llm_url, LLM_MODEL="scripted")
    if COMMANDER_TOKEN:
        env["COMMANDER_TOKEN"] = COMMANDER_TOKEN
    targets = ",".join(r.addr for r in reps)
    cmd = [sys.executable, "-m", "commander", "--dispatcher", targets, "--slots", str(SESSIONS)]
    with open(OUT / "fleet-commander.log", "wb") as logf:
        return subprocess.Popen(
            [*cmd, "--log-level", "WARNING"], env=env, stdout=logf, stderr=subprocess.STDOUT
        )


async def live_parts(
    reps: list[Replica], pids: dict[str, list[int]], eng: Engines
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    chans = [grpc.aio.insecure_channel(r.addr) for r in reps]
    try:
        await wait_for_slots(chans[1], SESSIONS, "the commander's slots")
        stubs = [tasks_pb2_grpc.TaskServiceStub(c) for c in chans]
        log(f"relay + cancel: {SESSIONS} sessions for {RELAY_SECONDS:.0f} s")
        groups = {**pids, **{f"replica r{r.n}": [r.proc.pid] for r in reps}}
        groups["this driver (watchers)"] = [os.getpid()]
        a = {k: cpu_of(v) for k, v in groups.items()}
        ma, t_a = machine_busy(), time.monotonic()
        res["relay"] = await relay_and_cancel(stubs)
        wall = time.monotonic() - t_a
        split = {k: (cpu_of(v) - a[k]) / wall for k, v in groups.items()}
        for k, late in late_cpu(groups, eng.pids()).items():
            split[k] = split.get(k, 0.0) + late / wall
        split["other processes on the machine"] = max(
            0.0, (machine_busy()[0] - ma[0]) / wall - sum(split.values())
        )
        res["relay"]["split"] = split
        log(
            "relay phase CPU (% of one core): "
            + ", ".join(f"{k} {v * 100:.0f}%" for k, v in split.items())
        )
        log(f"cancel storm: {STORM} tasks cancelled at once")
        res["storm"] = await cancel_storm(stubs)
        log("hand-over: kill -9 of r1")
        res["kill -9"] = await one_handover("kill -9", reps[0], chans[0], chans[1:], chans[2])
        await asyncio.get_running_loop().run_in_executor(None, reps[0].start)
        await chans[0].close()
        chans[0] = grpc.aio.insecure_channel(reps[0].addr)
        await wait_for_slots(chans[0], SESSIONS, "the commander's slots after kill -9")
        # The sessions went to r2 (the commander's next address): SIGTERM r2.
        log("hand-over: SIGTERM of r2")
        res["SIGTERM"] = await one_handover(
            "SIGTERM", reps[1], chans[1], [chans[2], chans[0]], chans[2]
        )
        await asyncio.get_running_loop().run_in_executor(None, reps[1].stop)
    finally:
        for c in chans:
            await c.close()
    return res


def relay_only() -> int:
    """BENCH_FLEET_RELAY_ONLY=1: PostgreSQL, Redis, three replicas, the model and
    one commander; the relay + cancel phase alone, with its legs."""
    eng = Engines()
    reps: list[Replica] = []
    llm: subprocess.Popen[bytes] | None = None
    try:
        if SINGLE:
            one = Replica(1, eng, fleet=False)
            reps = [one, one, one]
        else:
            reps = [Replica(n, eng) for n in (1, 2, 3)]
        llm = start_scriptedllm()
        llm_url = f"http://{wait_addr(OUT / 'fleet-scriptedllm.addr', llm, 'scriptedllm')}/v1"
        commander = start_commander(reps[:1] if SINGLE else reps, llm_url)

        async def run() -> dict[str, Any]:
            chans = [grpc.aio.insecure_channel(r.addr) for r in reps]
            try:
                await wait_for_slots(chans[1], SESSIONS, "the commander's slots")
                stubs = [tasks_pb2_grpc.TaskServiceStub(c) for c in chans]
                log(
                    f"relay + cancel: {SESSIONS} sessions, {RELAY_SECONDS:.0f} s, "
                    f"{DISPATCHER_BIN}, PostgreSQL durable: {PG_DURABLE == '1'}"
                )
                groups = {
                    **eng.pids(),
                    **{f"replica r{r.n}": [r.proc.pid] for r in reps[: 1 if SINGLE else 3]},
                    "commander": [commander.pid],
                    "this driver (watchers)": [os.getpid()],
                }
                a = {k: cpu_of(v) for k, v in groups.items()}
                ma, t_a = machine_busy(), time.monotonic()
                out = await relay_and_cancel(stubs)
                wall = time.monotonic() - t_a
                split = {k: (cpu_of(v) - a[k]) / wall for k, v in groups.items()}
                for k, late in late_cpu(groups, eng.pids()).items():
                    split[k] = split.get(k, 0.0) + late / wall
                split["other processes on the machine"] = max(
                    0.0, (machine_busy()[0] - ma[0]) / wall - sum(split.values())
                )
                log(
                    "relay phase CPU (% of one core): "
                    + ", ".join(f"{k} {v * 100:.0f}%" for k, v in split.items())
                )
                log(f"cancel storm: {STORM} tasks cancelled at once")
                out["storm"] = await cancel_storm(stubs)
                return out
            finally:
                for c in chans:
                    await c.close()

        try:
            rel = asyncio.run(run())
        finally:
            stop_process(commander)
    finally:
        if llm is not None:
            stop_process(llm)
        for r in reps:
            r.stop()
        eng.close()
    if DUMP_PATH:
        with open(DUMP_PATH, "w") as f:
            for row in DUMP:
                f.write(json.dumps(row) + "\n")
    rows = {
        "emit → watcher, same replica (r1)": rel["same"],
        "emit → watcher, other replica (r2)": rel["other"],
        **LEGS,
        "CancelTask on r3 → stopped recorded (r1)": rel["recorded"],
        "CancelTask on r3 → stopped seen on r2": rel["seen"],
        "stopped recorded (r1) → seen on r2": rel["rec_to_seen"],
    }
    latencies: list[dict[str, Any]] = [
        {"name": k, "summary": latency_summary(v)} for k, v in rows.items()
    ] + storm_rows(rel["storm"])
    for lat in latencies:
        s = lat["summary"]
        print(
            f"{lat['name']}: n {s['n']} p50 {s['p50_ms']} p90 {s['p90_ms']} "
            f"p99 {s['p99_ms']} max {s['max_ms']} ms",
            file=sys.stderr,
        )
    ok = rel["no_stopped"] == 0 and rel["errors"] == 0 and rel["tasks"] > 0
    print(
        f"check every relay task stopped: {'ok' if ok else 'FAILED'} ({rel['tasks']} tasks, "
        f"{rel['no_stopped']} without stopped, {rel['errors']} errors; "
        f"{SUBMIT_RETRIES[0]} submits retried)",
        file=sys.stderr,
    )
    print(
        f"check every cancel storm task stopped: "
        f"{'ok' if storm_check(rel['storm'])['pass'] else 'FAILED'} "
        f"({storm_check(rel['storm'])['detail']})",
        file=sys.stderr,
    )
    checks = [
        check("every relay task stopped", ok, f"{rel['tasks']} tasks"),
        storm_check(rel["storm"]),
    ]
    params = {
        "sessions": SESSIONS,
        "cancel_storm": STORM,
        "model_tokens_per_s": RATE,
        "replicas": 3,
        "binary": DISPATCHER_BIN,
        "postgres_durable": PG_DURABLE == "1",
    }
    return write_result(
        make_result("fleet", f"fleet-relay@{SESSIONS}", params, latencies=latencies, checks=checks)
    )


def main() -> int:
    arg_parser(__doc__).parse_args()
    if RELAY_ONLY:
        return relay_only()
    t0 = time.monotonic()
    single_pid = int(os.environ["DISPATCHER_PID"])
    res: dict[str, Any] = {}
    log("flood: single node, SQLite")
    res["flood sqlite"] = flood(
        [(ADDR, single_pid)], "fleet-flood-sqlite", {"dispatcher": [single_pid]}
    )
    log(report_split("single node, SQLite", res["flood sqlite"]))
    eng = Engines()
    reps: list[Replica] = []
    llm: subprocess.Popen[bytes] | None = None
    pg_single: subprocess.Popen[bytes] | None = None
    try:
        log(f"PostgreSQL {eng.dsn}, Redis {eng.redis}")
        # A single node on PostgreSQL (no Redis): the store's share.
        addr_file = OUT / "fleet-pg-single.addr"
        addr_file.unlink(missing_ok=True)
        argv = [
            DISPATCHER_BIN,
            "--listen",
            "127.0.0.1:0",
            "--addr-file",
            str(addr_file),
            "--http-listen",
            "",
            "--data-dir",
            str(eng.dir / "data-single"),
            "--queue-size",
            "100000",
            "--storage-backend",
            "postgres",
            "--postgres-dsn",
            eng.dsn,
            "--commander-token",
            COMMANDER_TOKEN,
            "--client-token",
            CLIENT_TOKEN,
        ]
        with open(OUT / "fleet-pg-single.log", "wb") as logf:
            pg_single = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        addr = wait_addr(addr_file, pg_single, "the postgres single node")
        log("flood: single node, PostgreSQL")
        res["flood postgres"] = flood(
            [(addr, pg_single.pid)],
            "fleet-flood-pg",
            {"dispatcher": [pg_single.pid], **eng.pids()},
        )
        log(report_split("single node, PostgreSQL", res["flood postgres"]))
        stop_process(pg_single)
        reps = [Replica(n, eng) for n in (1, 2, 3)]
        llm = start_scriptedllm()
        llm_url = f"http://{wait_addr(OUT / 'fleet-scriptedllm.addr', llm, 'scriptedllm')}/v1"
        commander = start_commander(reps, llm_url)
        try:
            pids = {"commander": [commander.pid], "scriptedllm": [llm.pid], **eng.pids()}
            res.update(asyncio.run(live_parts(reps, pids, eng)))
        finally:
            stop_process(commander)
        stop_process(llm)
        # The flood last: three replicas again (r2 was stopped by the SIGTERM
        # round), no commander, nothing else running.
        reps[1].start()
        log("flood: the fleet, three replicas")
        res["flood fleet"] = flood(
            [(r.addr, r.proc.pid) for r in reps],
            "fleet-flood-fleet",
            {f"replica r{r.n}": [r.proc.pid] for r in reps} | eng.pids(),
            pprof=reps[0].pprof,
        )
        res["pprof"] = pprof_top(OUT / "fleet-flood-fleet-r1.pprof")
        for line in res["pprof"]:
            log(f"pprof r1: {line}")
        log(report_split("fleet of three", res["flood fleet"]))
    finally:
        if llm is not None:
            stop_process(llm)
        if pg_single is not None and pg_single.poll() is None:
            stop_process(pg_single)
        for r in reps:
            r.stop()
        eng.close()
    return emit(res, time.monotonic() - t0)


def goal(what: str, got: float, limit: float) -> str:
    return f"goal {what} ≤ {limit} ms: {'met' if got <= limit else 'missed'} ({got} ms)"


def emit(res: dict[str, Any], took: float) -> int:
    rel = res["relay"]
    same, other = latency_summary(rel["same"]), latency_summary(rel["other"])
    stop_rec, stop_seen = latency_summary(rel["recorded"]), latency_summary(rel["seen"])
    k9, term = res["kill -9"], res["SIGTERM"]
    params = {
        "sessions": SESSIONS,
        "cancel_storm": STORM,
        "model_tokens_per_s": RATE,
        "replicas": 3,
        "store": "postgres",
        "bus": "redis",
        "seconds": round(took),
    }
    latencies: list[dict[str, Any]] = [
        {"name": "emit → watcher, same replica (r1)", "summary": same},
        {"name": "emit → watcher, other replica (r2)", "summary": other},
        {"name": "CancelTask on r3 → stopped recorded (r1)", "summary": stop_rec},
        {"name": "CancelTask on r3 → stopped seen on r2", "summary": stop_seen},
        *storm_rows(res["storm"]),
        {"name": "kill -9 → re-attached recorded", "summary": latency_summary(k9["back"])},
        {"name": "kill -9 → first content again", "summary": latency_summary(k9["content_back"])},
        {"name": "SIGTERM → re-attached recorded", "summary": latency_summary(term["back"])},
        {
            "name": "SIGTERM → first content again",
            "summary": latency_summary(term["content_back"]),
        },
    ]
    values = []
    for key, name in (
        ("flood sqlite", "single node, SQLite"),
        ("flood postgres", "single node, PostgreSQL"),
        ("flood fleet", "fleet, 3 replicas"),
    ):
        f = res[key]
        values.append(value(f"{name}: events logged", round(f["logged"]), "/s"))
        values.append(
            value(f"{name}: events per server CPU-second", round(f["per_server_cpu_s"]), "")
        )
        for proc, share in f["split"].items():
            values.append(value(f"{name}: CPU {proc}", round(share * 100), "% of one core"))
    base = res["flood sqlite"]["logged"]
    fleet = res["flood fleet"]["logged"]
    if base > 0:
        values.append(
            value("fleet / single node SQLite, events logged", round(fleet / base, 3), "ratio")
        )
    pg = res["flood postgres"]["logged"]
    if pg > 0:
        values.append(
            value("fleet / single node PostgreSQL, events logged", round(fleet / pg, 3), "ratio")
        )
    for proc, share in rel["split"].items():
        values.append(value(f"relay phase: CPU {proc}", round(share * 100), "% of one core"))
    values.append(value("SubmitTask refused UNAVAILABLE and retried", SUBMIT_RETRIES[0], ""))
    values.append(value("kill -9: sessions moved", k9["moved"], ""))
    values.append(value("SIGTERM: sessions moved", term["moved"], ""))
    checks = [
        check(
            "every relay task stopped",
            rel["no_stopped"] == 0 and rel["errors"] == 0 and rel["tasks"] > 0,
            f"{rel['tasks']} tasks, {rel['no_stopped']} without stopped, {rel['errors']} errors",
        ),
        storm_check(res["storm"]),
        check(
            "kill -9: sessions moved and streamed on",
            k9["flowing"] and k9["moved"] > 0 and k9["still_streaming"],
            f"{k9['moved']}/{SESSIONS} re-attached; all streaming after: {k9['still_streaming']}",
        ),
        check(
            "SIGTERM: sessions moved and streamed on",
            term["flowing"] and term["moved"] > 0 and term["still_streaming"],
            f"{term['moved']}/{SESSIONS} re-attached; "
            f"all streaming after: {term['still_streaming']}",
        ),
        check(
            "no task lost (every one ended CANCELLED by the bench)",
            k9["not_cancelled"] == 0 and term["not_cancelled"] == 0,
            f"kill -9 {k9['not_cancelled']}, SIGTERM {term['not_cancelled']} not CANCELLED",
        ),
        check(
            "every flood run reported",
            all(
                res[k]["runs"] == res[k]["want"]
                for k in ("flood sqlite", "flood postgres", "flood fleet")
            ),
            ", ".join(
                f"{k} {res[k]['runs']}/{res[k]['want']}"
                for k in ("flood sqlite", "flood postgres", "flood fleet")
            ),
        ),
    ]
    result = make_result(
        "fleet", f"fleet@{SESSIONS}", params, latencies=latencies, values=values, checks=checks
    )
    notes = [
        goal("cross-replica relay p99", other["p99_ms"], 5),
        goal("cross-replica stop p99", stop_seen["p99_ms"], 10),
        report_split("flood single node SQLite", res["flood sqlite"]),
        report_split("flood single node PostgreSQL", res["flood postgres"]),
        report_split("flood fleet of three", res["flood fleet"]),
    ]
    notes += [f"pprof r1 (fleet flood): {line}" for line in res.get("pprof", [])]
    result["notes"] = notes
    for lat in latencies:
        s = lat["summary"]
        print(
            f"{lat['name']}: n {s['n']} p50 {s['p50_ms']} ms "
            f"p99 {s['p99_ms']} ms max {s['max_ms']} ms",
            file=sys.stderr,
        )
    for v in values:
        print(f"{v['name']}: {v['value']} {v['unit']}", file=sys.stderr)
    for n in notes:
        print(n, file=sys.stderr)
    for c in checks:
        print(
            f"check {c['name']}: {'ok' if c['pass'] else 'FAILED'} ({c['detail']})", file=sys.stderr
        )
    return write_result(result)


if __name__ == "__main__":
    sys.exit(main())
