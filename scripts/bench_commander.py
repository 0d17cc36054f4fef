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
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
import urllib.request
from typing import Any

import grpc

from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2, agent_pb2_grpc

QUICK = os.environ.get("BENCH_QUICK") == "1"
SLOTS = 4 if QUICK else 16
ROUNDS = 3 if QUICK else 6
ADDR = os.environ["DISPATCHER_ADDR"]
LLM = os.environ["SCRIPTED_LLM_URL"]
CLIENT_TOKEN = os.environ.get("DISPATCHER_CLIENT_TOKEN", "")


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[max(1, math.ceil(p / 100 * len(s))) - 1]


def summary(xs: list[float]) -> dict[str, Any]:
    return {
        "n": len(xs),
        "min_ms": round(min(xs), 3) if xs else 0,
        "mean_ms": round(sum(xs) / len(xs), 3) if xs else 0,
        "p50_ms": round(pct(xs, 50), 3),
        "p90_ms": round(pct(xs, 90), 3),
        "p99_ms": round(pct(xs, 99), 3),
        "max_ms": round(max(xs), 3) if xs else 0,
    }


def ts_us(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


async def one_task(
    stub: tasks_pb2_grpc.TaskServiceStub, md: list[tuple[str, str]], name: str, out: dict[str, Any]
) -> None:
    resp = await stub.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction=name, planner="chat"), metadata=md
    )
    task_id = resp.task_id
    cancel_at: float | None = None
    stop_us = stopped_us = 0
    content_after_stop = 0
    async for ev in stub.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task_id), metadata=md):
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
                            metadata=md,
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


async def drive(md: list[tuple[str, str]], out: dict[str, Any]) -> bool:
    """Waits for the commander's slots, then runs ROUNDS rounds of SLOTS tasks."""
    async with grpc.aio.insecure_channel(ADDR) as ch:
        agent = agent_pb2_grpc.AgentStub(ch)
        deadline = time.monotonic() + 30
        while True:
            info = await agent.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), metadata=md)
            if info.maxConcurrentTasks >= SLOTS:
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        for r in range(ROUNDS):
            await asyncio.gather(*(one_task(stub, md, f"bench-{r}-{i}", out) for i in range(SLOTS)))
    return True


def main() -> int:
    md = [("authorization", f"Bearer {CLIENT_TOKEN}")] if CLIENT_TOKEN else []
    env = dict(os.environ, LLM_BASE_URL=LLM, LLM_MODEL="scripted")
    if os.environ.get("DISPATCHER_COMMANDER_TOKEN"):
        env["COMMANDER_TOKEN"] = os.environ["DISPATCHER_COMMANDER_TOKEN"]
    cmd = [sys.executable, "-m", "commander", "--dispatcher", ADDR, "--slots", str(SLOTS)]
    proc = subprocess.Popen([*cmd, "--log-level", "WARNING"], env=env)
    out: dict[str, Any] = {"relay": [], "stop_ack": [], "stops": {}, "content_after_stop": 0}
    try:
        if not asyncio.run(drive(md, out)):
            print("commander slots did not register", file=sys.stderr)
            return 1
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    with urllib.request.urlopen(LLM.removesuffix("/v1") + "/stats", timeout=5) as f:
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
        {"name": "every task stopped", "pass": stops == tasks, "detail": f"{stops}/{tasks}"},
        {
            "name": "no content after stop",
            "pass": out["content_after_stop"] == 0,
            "detail": str(out["content_after_stop"]),
        },
        {
            "name": "model streams closed by client",
            "pass": not_closed == 0 and bool(close_ms),
            "detail": f"{len(close_ms)} closed, {not_closed} not",
        },
    ]
    result = {
        "scenario": "python-commander-stop",
        "label": f"py-commander-stop@{SLOTS}",
        "params": {"slots": SLOTS, "tasks": tasks, "model": "scriptedllm"},
        "latencies": [
            {"name": "stop decision -> stopped ack", "summary": summary(out["stop_ack"])},
            {"name": "stop decision -> model stream closed", "summary": summary(close_ms)},
            {"name": "commander emit -> client receives", "summary": summary(out["relay"])},
        ],
        "checks": checks,
        "ok": all(c["pass"] for c in checks),
    }
    for lat in result["latencies"]:
        print(f"{lat['name']}: {lat['summary']}", file=sys.stderr)
    for c in checks:
        verdict = "ok" if c["pass"] else "FAILED"
        print(f"check {c['name']}: {verdict} ({c['detail']})", file=sys.stderr)
    if path := os.environ.get("BENCH_RESULTS"):
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
