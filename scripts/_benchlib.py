"""What the Python benchmark drivers (scripts/bench_*.py) share.

The drivers run as scripts (``.venv/bin/python scripts/bench_x.py``, as
scripts/bench.sh and scripts/bench_profile.sh call them), so the scripts
directory is ``sys.path[0]`` and they ``import _benchlib`` from there.

Here: the dispatcher's address and tokens from the environment, call
metadata, /proc CPU time, nearest-rank percentiles and loadgen's latency
summary, waiting for commander slots, a raw grpc.aio commander slot (one
packet per message, or batched when waiting as the commander's writer does), a
``commander.Commander`` with given planners, child processes and py-spy,
and the result line in loadgen's ``--json`` shape, appended to
$BENCH_RESULTS.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import interaction_pb2_grpc
from commander._gen.lybic.agent import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:
    from commander import PlannerRegistry

QUICK = os.environ.get("BENCH_QUICK") == "1"
ADDR = os.environ.get("DISPATCHER_ADDR", "127.0.0.1:50051")
COMMANDER_TOKEN = os.environ.get("DISPATCHER_COMMANDER_TOKEN", "")
CLIENT_TOKEN = os.environ.get("DISPATCHER_CLIENT_TOKEN", "")
TERMINAL = frozenset({agent_pb2.SUCCESS, agent_pb2.FAILURE, agent_pb2.CANCELLED})


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help prints the driver's docstring."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def md(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def cpu_seconds(pid: int) -> float:
    """utime+stime of pid from /proc/PID/stat, in seconds (USER_HZ = 100)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile p (0 < p <= 1) of xs, as loadgen's; NaN for none."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p * len(s)) - 1))]


def latency_summary(xs: list[float]) -> dict[str, Any]:
    """Latencies in ms as a loadgen result summarizes them (zeros for none)."""
    if not xs:
        return {k: 0 for k in ("n", "min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
    return {
        "n": len(xs),
        "min_ms": round(min(xs), 3),
        "mean_ms": round(sum(xs) / len(xs), 3),
        "p50_ms": round(pct(xs, 0.5), 3),
        "p90_ms": round(pct(xs, 0.9), 3),
        "p99_ms": round(pct(xs, 0.99), 3),
        "max_ms": round(max(xs), 3),
    }


class SlotsNotRegistered(RuntimeError):
    """The commander slots a driver waits for did not register in time."""


async def wait_for_slots(ch: grpc.aio.Channel, n: int, what: str) -> None:
    """Waits until the dispatcher on ch counts at least n commander slots
    (what names them in the SlotsNotRegistered raised after 30 s)."""
    agent = agent_pb2_grpc.AgentStub(ch)
    deadline = time.monotonic() + 30
    while (
        await agent.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), metadata=md(CLIENT_TOKEN))
    ).maxConcurrentTasks < n:
        if time.monotonic() > deadline:
            raise SlotsNotRegistered(f"{what} did not register within 30 s")
        await asyncio.sleep(0.05)


# --- a raw grpc.aio commander slot ----------------------------------------------


async def open_slot(
    ch: grpc.aio.Channel, commander_id: str, capabilities: list[str], slot_index: int = 0
) -> Any:
    """A ChatStream on ch that has said hello; the caller reads and writes it."""
    call = interaction_pb2_grpc.AgentInteractionStub(ch).ChatStream(metadata=md(COMMANDER_TOKEN))
    hello = ipb.Hello(
        commander_id=commander_id,
        version="0",
        capabilities=capabilities,
        slot_index=slot_index,
    )
    await call.write(ipb.UpstreamPacket(hello=hello))
    return call


async def next_start(call: Any) -> Any:
    """The next start packet on a slot's stream, or None when the stream ends."""
    while True:
        down = await call.read()
        if down is grpc.aio.EOF:
            return None
        if down.WhichOneof("signal") == "start":
            return down


async def write_session(
    call: Any, sid: str, chunks: Iterable[ipb.ContentChunk], unit: str = "packets"
) -> int:
    """Writes chunks as content packets of session sid, each stamped with the
    time it is written, then a SUCCESS result "<n> <unit>"; returns n."""
    n = 0
    for chunk in chunks:
        await call.write(
            ipb.UpstreamPacket(session_id=sid, timestamp=time.time_ns() // 1000, content=chunk)
        )
        n += 1
    result = ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result=f"{n} {unit}")
    await call.write(ipb.UpstreamPacket(session_id=sid, result=result))
    return n


async def hello_ack(call: Any) -> int:
    """Reads the answer to open_slot's hello; returns its max_upstream_batch
    (0: the dispatcher takes no UpstreamBatch)."""
    down = await call.read()
    if down is grpc.aio.EOF or down.WhichOneof("signal") != "ack":
        raise RuntimeError(f"expected the hello's ack, got {down!r}")
    return int(down.ack.max_upstream_batch)


async def write_session_batched(
    call: Any,
    sid: str,
    chunks: Iterable[ipb.ContentChunk],
    batch: int,
    *,
    yield_every: int = 1,
    rate: float = 0.0,
    unit: str = "packets",
) -> dict[str, int]:
    """write_session the way the commander's writer sends: a planner task hands
    each content packet over (yielding to the loop every ``yield_every``, at
    ``rate`` packets/s if > 0, at most ``batch`` ahead of the writer), and the
    writer sends what it finds waiting as one UpstreamBatch (at most ``batch``),
    a lone packet alone, never waiting to fill one. Returns the content packets
    (``packets``), the messages written and how many were batches."""
    batch = max(batch, 1)
    queue: collections.deque[ipb.UpstreamPacket] = collections.deque()
    wake, room = asyncio.Event(), asyncio.Event()
    room.set()
    finished = False
    count = 0

    async def planner() -> None:
        try:
            await plan()
        finally:
            wake.set()  # the end, or the planner's error, wakes the writer

    async def plan() -> None:
        nonlocal finished, count
        t0 = time.monotonic()
        for i, chunk in enumerate(chunks):
            if rate > 0 and (ahead := i / rate - (time.monotonic() - t0)) > 0:
                await asyncio.sleep(ahead)
            while len(queue) >= batch:
                room.clear()
                await room.wait()
            now = time.time_ns() // 1000
            queue.append(ipb.UpstreamPacket(session_id=sid, timestamp=now, content=chunk))
            wake.set()
            count += 1
            if count % yield_every == 0:
                await asyncio.sleep(0)  # a real planner awaits its model between tokens
        result = ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result=f"{count} {unit}")
        queue.append(ipb.UpstreamPacket(session_id=sid, result=result))
        finished = True

    task = asyncio.create_task(planner())
    messages = batches = 0
    try:
        while True:
            if not queue:
                if finished:
                    break
                if task.done():
                    task.result()  # the planner failed: raise its error
                wake.clear()
                await wake.wait()
                continue
            n = min(len(queue), batch)
            packets = [queue.popleft() for _ in range(n)]
            room.set()
            messages += 1
            if n == 1:
                await call.write(packets[0])
            else:
                batches += 1
                await call.write(ipb.UpstreamPacket(batch=ipb.UpstreamBatch(packets=packets)))
    finally:
        task.cancel()
    return {"packets": count, "messages": messages, "batches": batches}


# --- the real commander -------------------------------------------------------------


def run_commander(planners: PlannerRegistry, slots: int, commander_id: str) -> None:
    """Runs a commander.Commander with planners and slots until it is stopped."""
    from commander import Commander, ConnectionConfig

    async def main() -> None:
        commander = Commander(
            ConnectionConfig(target=ADDR, token=COMMANDER_TOKEN or None),
            slots=slots,
            planners=planners,
            commander_id=commander_id,
        )
        await commander.run()

    asyncio.run(main())


# --- processes ------------------------------------------------------------------------


def spawn_self(script: str, *args: str) -> subprocess.Popen[bytes]:
    """Runs script (a driver's __file__) again as a child process with args."""
    return subprocess.Popen([sys.executable, os.path.abspath(script), *args])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Terminates proc, and kills it if it has not ended after timeout seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_pyspy(pid: int, name: str) -> subprocess.Popen[bytes] | None:
    """With BENCH_PYSPY=DIR: py-spy records pid into DIR/pyspy-NAME.txt
    (collapsed stacks), attached to pid itself and without pausing it."""
    out_dir = os.environ.get("BENCH_PYSPY")
    spy_bin = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not out_dir or not os.path.exists(spy_bin):
        return None
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"pyspy-{name}.txt")
    argv = [spy_bin, "record", "--rate", "250", "--nonblocking", "--format", "raw"]
    return subprocess.Popen([*argv, "-o", out, "--pid", str(pid)], stdout=subprocess.DEVNULL)


def stop_pyspy(spy: subprocess.Popen[bytes] | None) -> None:
    """SIGINT makes py-spy write its profile."""
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


# --- the result line ------------------------------------------------------------------


def value(name: str, v: float, unit: str) -> dict[str, Any]:
    """One entry of a result's "values"."""
    return {"name": name, "value": v, "unit": unit}


def check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    """One entry of a result's "checks"."""
    return {"name": name, "pass": passed, "detail": detail}


def make_result(
    scenario: str,
    label: str,
    params: dict[str, Any],
    *,
    values: list[dict[str, Any]] | None = None,
    latencies: list[dict[str, Any]] | None = None,
    checks: list[dict[str, Any]],
) -> dict[str, Any]:
    """A result in loadgen's --json shape; it is ok when every check passed."""
    result: dict[str, Any] = {"scenario": scenario, "label": label, "params": params}
    if latencies is not None:
        result["latencies"] = latencies
    if values is not None:
        result["values"] = values
    result["checks"] = checks
    result["ok"] = all(c["pass"] for c in checks)
    return result


def write_result(result: dict[str, Any]) -> int:
    """Appends result as one JSON line to $BENCH_RESULTS, if set, and returns
    the driver's exit status: 0 if the result is ok, else 1."""
    if path := os.environ.get("BENCH_RESULTS"):
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1
