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

import asyncio
import os
import random
import sys
import time
from typing import Any

import grpc
from _benchlib import (
    ADDR,
    CLIENT_TOKEN,
    QUICK,
    TERMINAL,
    arg_parser,
    check,
    latency_summary,
    make_result,
    md,
    pct,
    run_commander,
    spawn_self,
    stop_process,
    value,
    wait_for_slots,
    write_result,
)

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2

SLOTS = int(os.environ.get("BENCH_PY_SLOTS", "8"))
DURATION = float(os.environ.get("BENCH_PY_DURATION", "5" if QUICK else "15"))
TEXT = "x" * 64
#: The latencies measured: key in the driver's output, name in the result.
LATENCIES = (
    ("decision_to_stopped", "stop decision → stopped recorded"),
    ("cancel_to_stopped", "cancel call → stopped recorded"),
    # The stopped event's emitted_at_us is the commander's packet timestamp
    # (when it made the packet): the two legs of decision → stopped recorded.
    ("decision_to_made", "  leg: stop decision → commander made stopped"),
    ("made_to_stopped", "  leg: commander made stopped → recorded"),
)


def run_flood_commander() -> None:
    from commander import PlannerRegistry, SessionContext

    planners = PlannerRegistry()

    @planners.register("flood")
    async def flood(ctx: SessionContext):  # type: ignore[no-untyped-def]
        chunk = ipb.ContentChunk(text=TEXT)
        while True:
            yield chunk

    run_commander(planners, SLOTS, "bench-py-stopflood")


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

        stop_t = stopped_t = made_t = 0.0
        contents = chars = 0
        first_t = 0.0
        status = 0
        async for resp in tasks.WatchTask(tasks_pb2.WatchTaskRequest(task_id=tid), metadata=meta):
            ev = resp.event
            kind = ev.WhichOneof("kind")
            if kind == "content":
                contents += 1
                chars += len(ev.content.text)
                if cancel_task is None:
                    first_t = time.time()
                    cancel_task = asyncio.create_task(cancel())
            elif kind == "stop" and not stop_t:
                stop_t = ev.time.ToNanoseconds() / 1e9
            elif kind == "stopped":
                stopped_t = ev.time.ToNanoseconds() / 1e9
                made_t = ev.emitted_at_us / 1e6
            elif kind == "state" and ev.state.status in TERMINAL:
                status = ev.state.status
                break
        if cancel_task is not None:
            await cancel_task
        if status == agent_pb2.CANCELLED and stop_t and stopped_t:
            out["decision_to_stopped"].append((stopped_t - stop_t) * 1000)
            out["cancel_to_stopped"].append((stopped_t - cancel_at[0]) * 1000)
            if made_t:
                out["decision_to_made"].append((made_t - stop_t) * 1000)
                out["made_to_stopped"].append((stopped_t - made_t) * 1000)
            out["contents"].append(float(contents))
            if cancel_at[0] > first_t:
                # Content characters recorded per second from the first to the cancel call.
                out["rate"].append(chars / (cancel_at[0] - first_t))
        else:
            out["other"].append(float(status))


async def drive() -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "decision_to_stopped": [], "cancel_to_stopped": [], "decision_to_made": [],
        "made_to_stopped": [], "contents": [], "rate": [], "other": [],
    }  # fmt: skip
    async with grpc.aio.insecure_channel(ADDR) as ch:
        await wait_for_slots(ch, SLOTS, "the commander's slots")
        tasks = tasks_pb2_grpc.TaskServiceStub(ch)
        deadline = time.monotonic() + DURATION
        await asyncio.gather(*(lane(tasks, random.Random(i), deadline, out) for i in range(SLOTS)))
    return out


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--role", choices=["driver", "commander"], default="driver")
    if ap.parse_args().role == "commander":
        run_flood_commander()
        return 0
    proc = spawn_self(__file__, "--role", "commander")
    try:
        out = asyncio.run(drive())
    finally:
        stop_process(proc)
    values = []
    for key, name in LATENCIES:
        xs = out[key]
        print(
            f"  {name:36s} n={len(xs)} p50={pct(xs, 0.5):.2f}ms p90={pct(xs, 0.9):.2f}ms "
            f"p99={pct(xs, 0.99):.2f}ms max={max(xs, default=float('nan')):.2f}ms",
            file=sys.stderr,
        )
    c, rate = out["contents"], out["rate"]
    print(
        f"  content events recorded per task    p50={pct(c, 0.5):.0f} "
        f"(tasks cancelled {len(c)}, ended otherwise {len(out['other'])}); "
        f"content characters per second per task p50={pct(rate, 0.5):.0f}",
        file=sys.stderr,
    )
    latencies = [
        {"name": name, "summary": latency_summary(out[key])} for key, name in LATENCIES if out[key]
    ]
    if c:
        values.append(value("content events recorded per task, p50", pct(c, 0.5), "events"))
    if rate:
        values.append(
            value("content characters per second per task, p50", round(pct(rate, 0.5)), "chars/s")
        )
    ok = not out["other"] and bool(out["decision_to_stopped"])
    params = {"slots": SLOTS, "duration_s": DURATION, "packet_bytes": len(TEXT)}
    checks = [check("every task cancelled", ok, f"{len(out['other'])} ended otherwise")]
    result = make_result(
        "python-stop-flood",
        f"py-stop-flood@{SLOTS}",
        params,
        values=values,
        latencies=latencies,
        checks=checks,
    )
    return write_result(result)


if __name__ == "__main__":
    sys.exit(main())
