"""Stop under flood with the real Python commander (issue 7, stop-flood).

loadgen's stop-flood scenario floods from Go. This is the same question
asked of the real :class:`commander.Commander`: one commander process with
SLOTS slots (one HTTP/2 connection each) runs a ``flood`` planner, an async
generator yielding 64-byte ``ContentChunk`` packets until it is cancelled;
the driver runs SLOTS lanes, each submitting a task, watching it, cancelling
it 100-400 ms after its first content event and watching it to its end, for
DURATION seconds. Measured on the dispatcher's clock (event times): stop
decision (the ``stop`` event) → ``stopped`` recorded; and on the driver's
clock: CancelTask call → ``stopped`` recorded. Also the content events
recorded per task (how fast the commander streamed).

    DISPATCHER_ADDR=... DISPATCHER_COMMANDER_TOKEN=... DISPATCHER_CLIENT_TOKEN=... \\
        .venv/bin/python scripts/bench_pystopflood.py

Environment: BENCH_PY_SLOTS (default 8), BENCH_PY_DURATION (seconds; 15, BENCH_QUICK=1: 5),
BENCH_RESULTS (append one result line in loadgen's --json shape).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
from typing import Any

import grpc

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2

SLOTS = int(os.environ.get("BENCH_PY_SLOTS", "8"))
DURATION = float(
    os.environ.get("BENCH_PY_DURATION", "5" if os.environ.get("BENCH_QUICK") == "1" else "15")
)
ADDR = os.environ.get("DISPATCHER_ADDR", "127.0.0.1:50051")
COMMANDER_TOKEN = os.environ.get("DISPATCHER_COMMANDER_TOKEN", "")
CLIENT_TOKEN = os.environ.get("DISPATCHER_CLIENT_TOKEN", "")
TEXT = "x" * 64
TERMINAL = {agent_pb2.SUCCESS, agent_pb2.FAILURE, agent_pb2.CANCELLED}


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def run_commander() -> None:
    from commander import Commander, ConnectionConfig, PlannerRegistry, SessionContext

    planners = PlannerRegistry()

    @planners.register("flood")
    async def flood(ctx: SessionContext):  # type: ignore[no-untyped-def]
        chunk = ipb.ContentChunk(text=TEXT)
        while True:
            yield chunk

    async def main() -> None:
        commander = Commander(
            ConnectionConfig(target=ADDR, token=COMMANDER_TOKEN or None),
            slots=SLOTS,
            planners=planners,
            commander_id="bench-py-stopflood",
        )
        await commander.run()

    asyncio.run(main())


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (as loadgen's)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p * len(s)) - 1))]


async def lane(
    tasks: Any, rng: random.Random, deadline: float, out: dict[str, list[float]]
) -> None:
    meta = md(CLIENT_TOKEN)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        tid = (
            await tasks.SubmitTask(
                tasks_pb2.SubmitTaskRequest(instruction=f"flood #{n}", planner="flood"),
                metadata=meta,
            )
        ).task_id
        delay = rng.uniform(0.1, 0.4)
        cancel_at: list[float] = []
        cancel_task: asyncio.Task[Any] | None = None

        async def cancel(tid: str = tid, delay: float = delay, at: list[float] = cancel_at) -> None:
            await asyncio.sleep(delay)
            at.append(time.time())
            await tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=tid), metadata=meta)

        stop_t = stopped_t = 0.0
        contents = 0
        status = 0
        async for resp in tasks.WatchTask(tasks_pb2.WatchTaskRequest(task_id=tid), metadata=meta):
            ev = resp.event
            kind = ev.WhichOneof("kind")
            if kind == "content":
                contents += 1
                if cancel_task is None:
                    cancel_task = asyncio.create_task(cancel())
            elif kind == "stop" and not stop_t:
                stop_t = ev.time.ToNanoseconds() / 1e9
            elif kind == "stopped":
                stopped_t = ev.time.ToNanoseconds() / 1e9
            elif kind == "state" and ev.state.status in TERMINAL:
                status = ev.state.status
                break
        if cancel_task is not None:
            await cancel_task
        if status == agent_pb2.CANCELLED and stop_t and stopped_t:
            out["decision_to_stopped"].append((stopped_t - stop_t) * 1000)
            out["cancel_to_stopped"].append((stopped_t - cancel_at[0]) * 1000)
            out["contents"].append(float(contents))
        else:
            out["other"].append(float(status))


async def drive() -> dict[str, list[float]]:
    meta = md(CLIENT_TOKEN)
    out: dict[str, list[float]] = {
        "decision_to_stopped": [], "cancel_to_stopped": [], "contents": [], "other": [],
    }  # fmt: skip
    async with grpc.aio.insecure_channel(ADDR) as ch:
        from commander._gen.lybic.agent import agent_pb2_grpc

        agent = agent_pb2_grpc.AgentStub(ch)
        limit = time.monotonic() + 30
        while (
            await agent.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), metadata=meta)
        ).maxConcurrentTasks < SLOTS:
            if time.monotonic() > limit:
                raise RuntimeError("the commander's slots did not register within 30 s")
            await asyncio.sleep(0.05)
        tasks = tasks_pb2_grpc.TaskServiceStub(ch)
        deadline = time.monotonic() + DURATION
        await asyncio.gather(*(lane(tasks, random.Random(i), deadline, out) for i in range(SLOTS)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--role", choices=["driver", "commander"], default="driver")
    if ap.parse_args().role == "commander":
        run_commander()
        return 0
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", "commander"])
    try:
        out = asyncio.run(drive())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    values = []
    for key, name in (
        ("decision_to_stopped", "stop decision → stopped recorded"),
        ("cancel_to_stopped", "cancel call → stopped recorded"),
    ):
        xs = out[key]
        print(
            f"  {name:36s} n={len(xs)} p50={pct(xs, 0.5):.2f}ms p90={pct(xs, 0.9):.2f}ms "
            f"p99={pct(xs, 0.99):.2f}ms max={max(xs, default=float('nan')):.2f}ms",
            file=sys.stderr,
        )
    c = out["contents"]
    print(
        f"  content events recorded per task    p50={pct(c, 0.5):.0f} "
        f"(tasks cancelled {len(c)}, ended otherwise {len(out['other'])})",
        file=sys.stderr,
    )
    latencies = [
        {"name": name, "summary": {
            "n": len(out[key]), "min_ms": round(min(out[key], default=0.0), 3),
            "mean_ms": round(sum(out[key]) / max(len(out[key]), 1), 3),
            "p50_ms": round(pct(out[key], 0.5), 3),
            "p90_ms": round(pct(out[key], 0.9), 3),
            "p99_ms": round(pct(out[key], 0.99), 3),
            "max_ms": round(max(out[key], default=0.0), 3)}}
        for key, name in (("decision_to_stopped", "stop decision → stopped recorded"),
                          ("cancel_to_stopped", "cancel call → stopped recorded"))
        if out[key]
    ]  # fmt: skip
    if c:
        values.append({"name": "content events recorded per task, p50", "value": pct(c, 0.5),
                       "unit": "events"})  # fmt: skip
    ok = not out["other"] and bool(out["decision_to_stopped"])
    result = {
        "scenario": "python-stop-flood",
        "label": f"py-stop-flood@{SLOTS}",
        "params": {"slots": SLOTS, "duration_s": DURATION, "packet_bytes": len(TEXT)},
        "latencies": latencies,
        "values": values,
        "checks": [{"name": "every task cancelled", "pass": ok,
                    "detail": f"{len(out['other'])} ended otherwise"}],
        "ok": ok,
    }  # fmt: skip
    if path := os.environ.get("BENCH_RESULTS"):
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
