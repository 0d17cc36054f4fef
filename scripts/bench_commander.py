"""Stop and relay latency with the real Python commander (called by scripts/bench.sh).

A real `commander` process with SLOTS slots runs the chat planner against the
scripted model server, which streams tokens at a fixed rate. Each task is
cancelled at a random moment after its first content; from the task's events
and the model server's records this measures:

- stop decision -> `stopped` ack   (stop event time -> stopped event time, dispatcher clock)
- stop decision -> model stream closed (stop event time -> the model server's end of stream)
- commander emit -> client receives (content emitted_at_us -> WatchTask delivery)

and checks that no content reaches the watcher after the stop event and that
every cancelled model stream was closed by the client. Appends one JSON line
in loadgen's result shape to $BENCH_RESULTS.

Environment: DISPATCHER_ADDR, DISPATCHER_CLIENT_TOKEN, DISPATCHER_COMMANDER_TOKEN
(of the dispatcher), SCRIPTED_LLM_URL (the model server's /v1 URL), BENCH_QUICK=1
(4 slots, 3 rounds instead of 16 and 6).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from typing import Any

import grpc
from _benchlib import (
    ADDR,
    CLIENT_TOKEN,
    QUICK,
    SlotsNotRegistered,
    arg_parser,
    check,
    latency_summary,
    make_result,
    md,
    stop_process,
    wait_for_slots,
    write_result,
)

from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc

SLOTS = 4 if QUICK else 16
ROUNDS = 3 if QUICK else 6


def ts_us(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


async def one_task(stub: tasks_pb2_grpc.TaskServiceStub, name: str, out: dict[str, Any]) -> None:
    meta = md(CLIENT_TOKEN)
    resp = await stub.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction=name, planner="chat"), metadata=meta
    )
    task_id = resp.task_id
    cancel_at: float | None = None
    stop_us = stopped_us = 0
    content_after_stop = 0
    async for ev in stub.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task_id), metadata=meta):
        e = ev.event
        now_us = time.time_ns() // 1000
        kind = e.WhichOneof("kind")
        if kind in ("content", "thought"):
            if stop_us:
                content_after_stop += 1
            if e.emitted_at_us:
                out["relay"].append((now_us - e.emitted_at_us) / 1000)
            if kind == "content" and cancel_at is None:
                cancel_at = time.monotonic() + random.uniform(0.2, 1.0)
                asyncio.get_running_loop().call_later(
                    cancel_at - time.monotonic(),
                    lambda: asyncio.ensure_future(
                        stub.CancelTask(
                            tasks_pb2.CancelTaskRequest(task_id=task_id, reason="bench"),
                            metadata=meta,
                        )
                    ),
                )
        elif kind == "stop":
            stop_us = ts_us(e.time)
        elif kind == "stopped":
            stopped_us = ts_us(e.time)
    if stop_us and stopped_us:
        out["stop_ack"].append((stopped_us - stop_us) / 1000)
        out["stops"][name] = stop_us
    out["content_after_stop"] += content_after_stop


async def drive(out: dict[str, Any]) -> None:
    """Waits for the commander's slots, then runs ROUNDS rounds of SLOTS tasks."""
    async with grpc.aio.insecure_channel(ADDR) as ch:
        await wait_for_slots(ch, SLOTS, "commander slots")
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        for r in range(ROUNDS):
            await asyncio.gather(*(one_task(stub, f"bench-{r}-{i}", out) for i in range(SLOTS)))


def main() -> int:
    arg_parser(__doc__).parse_args()
    llm = os.environ["SCRIPTED_LLM_URL"]
    env = dict(os.environ, LLM_BASE_URL=llm, LLM_MODEL="scripted")
    if os.environ.get("DISPATCHER_COMMANDER_TOKEN"):
        env["COMMANDER_TOKEN"] = os.environ["DISPATCHER_COMMANDER_TOKEN"]
    cmd = [sys.executable, "-m", "commander", "--dispatcher", ADDR, "--slots", str(SLOTS)]
    proc = subprocess.Popen([*cmd, "--log-level", "WARNING"], env=env)
    out: dict[str, Any] = {"relay": [], "stop_ack": [], "stops": {}, "content_after_stop": 0}
    try:
        asyncio.run(drive(out))
    except SlotsNotRegistered as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        stop_process(proc)

    with urllib.request.urlopen(llm.removesuffix("/v1") + "/stats", timeout=5) as f:
        stats = json.load(f)
    close_ms: list[float] = []
    not_closed = 0
    for rec in stats["streams"]:
        stop_us = out["stops"].get(rec.get("last_user"))
        if stop_us is None:
            continue
        if rec["outcome"] == "client_closed" and rec.get("end_us"):
            close_ms.append((rec["end_us"] - stop_us) / 1000)
        else:
            not_closed += 1

    stops = len(out["stops"])
    tasks = SLOTS * ROUNDS
    checks = [
        check("every task stopped", stops == tasks, f"{stops}/{tasks}"),
        check(
            "no content after stop",
            out["content_after_stop"] == 0,
            str(out["content_after_stop"]),
        ),
        check(
            "model streams closed by client",
            not_closed == 0 and bool(close_ms),
            f"{len(close_ms)} closed, {not_closed} not",
        ),
    ]
    latencies = [
        {"name": "stop decision -> stopped ack", "summary": latency_summary(out["stop_ack"])},
        {"name": "stop decision -> model stream closed", "summary": latency_summary(close_ms)},
        {"name": "commander emit -> client receives", "summary": latency_summary(out["relay"])},
    ]
    params = {"slots": SLOTS, "tasks": tasks, "model": "scriptedllm"}
    result = make_result(
        "python-commander-stop",
        f"py-commander-stop@{SLOTS}",
        params,
        latencies=latencies,
        checks=checks,
    )
    for lat in result["latencies"]:
        print(f"{lat['name']}: {lat['summary']}", file=sys.stderr)
    for c in checks:
        verdict = "ok" if c["pass"] else "FAILED"
        print(f"check {c['name']}: {verdict} ({c['detail']})", file=sys.stderr)
    return write_result(result)


if __name__ == "__main__":
    sys.exit(main())
