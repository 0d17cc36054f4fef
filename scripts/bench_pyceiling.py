"""Issue 7 scenario 6: the Python commander's ceiling against raw grpc.aio.

Two writers, each one separate Python process with SLOTS ChatStreams to the
same dispatcher, measured the same way:

- ``commander``: the real :class:`commander.Commander` (public API only) with a
  ``flood`` planner, an async generator that yields ``ContentChunk`` packets
  as fast as the commander takes them;
- ``raw``: a minimal grpc.aio bidi client per slot (hello, wait for start,
  write ``UpstreamPacket{content}`` in a loop, then the result) — the floor
  any Python commander pays for grpc.aio itself, one packet per message;
- ``raw-batched``: the same, sending the way the commander's writer does
  since it batches: a planner task hands the packets over (yielding to the
  loop every 4, as the commander's hand-over does), the writer sends what it
  finds waiting as one ``UpstreamBatch`` (at most the hello ack's
  ``max_upstream_batch``), a lone packet alone.

The commander also folds consecutive waiting chunks into one packet (one
event); neither raw writer does, so each of their chunks is an event of its
own at the dispatcher. The ratio row is commander / raw-batched (both send
what waits as one message); commander / raw (one packet per message, the
figure of the rounds before) is printed beside it.

The driver submits TASKS tasks of PACKETS content packets each (planner
``flood``; a task is many packets but far below the dispatcher's per-task log
cap), polls GetTask (no watcher: this measures ingest), and computes on the
dispatcher's clock: packets/s = content packets of the SUCCESS tasks / (last
task's ended_at - first task's started_at). It also reads the CPU time of the
writer process and of the dispatcher from /proc. Result lines in loadgen's
``--json`` shape go to $BENCH_RESULTS; the ratio commander/raw is one value.

Run by scripts/bench.sh with DISPATCHER_ADDR, DISPATCHER_COMMANDER_TOKEN,
DISPATCHER_CLIENT_TOKEN, DISPATCHER_PID, BENCH_QUICK set. By hand::

    .venv/bin/python scripts/bench_pyceiling.py            # both writers
    BENCH_PYSPY=out/ .venv/bin/python scripts/bench_pyceiling.py   # + py-spy
"""

from __future__ import annotations

import asyncio
import itertools
import os
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
    cpu_seconds,
    hello_ack,
    make_result,
    md,
    next_start,
    open_slot,
    run_commander,
    spawn_self,
    start_pyspy,
    stop_process,
    stop_pyspy,
    value,
    wait_for_slots,
    write_result,
    write_session,
    write_session_batched,
)

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2

SLOTS = int(os.environ.get("BENCH_PY_SLOTS", "4"))
PACKET_BYTES = 64
PACKETS = int(os.environ.get("BENCH_PY_PACKETS", "5000" if QUICK else "10000"))
TASKS = int(os.environ.get("BENCH_PY_TASKS", str(SLOTS * (2 if QUICK else 5))))
TEXT = "x" * PACKET_BYTES


#: How each writer is named in the result rows.
WHO = {
    "commander": "real commander",
    "raw-batched": "raw grpc.aio, batched when waiting",
    "raw": "raw grpc.aio, one packet per message",
}


def task_size(instruction: str) -> int:
    """Packets a task asks for: its instruction is ``flood <packets>``."""
    return int(instruction.split()[1])


# --- writer: the real commander ------------------------------------------------


def run_flood_commander() -> None:
    from commander import PlannerRegistry, SessionContext

    planners = PlannerRegistry()

    @planners.register("flood")
    async def flood(ctx: SessionContext):  # type: ignore[no-untyped-def]
        n = task_size(ctx.instruction)
        chunk = ipb.ContentChunk(text=TEXT)
        for _ in range(n):
            yield chunk
        yield ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result=f"{n} packets")

    run_commander(planners, SLOTS, "bench-py-commander")


# --- writer: raw grpc.aio ------------------------------------------------------


#: The commander's hand-over yields to the loop every this many packets
#: (commander._writer.YIELD_EVERY); raw-batched's planner does the same.
RAW_YIELD_EVERY = 4


async def raw_slot(index: int, batched: bool) -> None:
    # Like the commander: one channel (one HTTP/2 connection) per stream.
    async with grpc.aio.insecure_channel(
        ADDR, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as ch:
        call = await open_slot(ch, "bench-py-raw", ["planner:flood"], slot_index=index)
        announced = await hello_ack(call)
        while (down := await next_start(call)) is not None:
            chunk = ipb.ContentChunk(text=TEXT)
            chunks = itertools.repeat(chunk, task_size(down.start.instruction))
            if batched:
                await write_session_batched(
                    call, down.session_id, chunks, announced, yield_every=RAW_YIELD_EVERY
                )
            else:
                await write_session(call, down.session_id, chunks)


def run_raw(batched: bool) -> None:
    async def main() -> None:
        await asyncio.gather(*(raw_slot(i, batched) for i in range(SLOTS)))

    asyncio.run(main())


# --- driver ----------------------------------------------------------------------


async def drive(writer_pid: int, name: str) -> dict[str, Any]:
    cmd = md(CLIENT_TOKEN)
    async with grpc.aio.insecure_channel(ADDR) as ch:
        await wait_for_slots(ch, SLOTS, f"{name}: slots")
        tasks = tasks_pb2_grpc.TaskServiceStub(ch)
        dpid = int(os.environ.get("DISPATCHER_PID", "0"))
        cpu0 = cpu_seconds(writer_pid)
        dcpu0 = cpu_seconds(dpid) if dpid else 0.0
        wall0 = time.monotonic()
        ids = []
        for i in range(TASKS):
            resp = await tasks.SubmitTask(
                tasks_pb2.SubmitTaskRequest(
                    instruction=f"flood {PACKETS} #{i}", planner="flood", timeout_seconds=600
                ),
                metadata=cmd,
            )
            ids.append(resp.task_id)
        done: dict[str, Any] = {}
        limit = time.monotonic() + 600
        while len(done) < len(ids):
            if time.monotonic() > limit:
                raise RuntimeError(f"{name}: tasks did not finish within 600 s")
            await asyncio.sleep(0.1)
            for tid in ids:
                if tid in done:
                    continue
                t = (await tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=tid), metadata=cmd)).task
                if t.status in TERMINAL:
                    done[tid] = t
        wall = time.monotonic() - wall0
        cpu = cpu_seconds(writer_pid) - cpu0
        dcpu = (cpu_seconds(dpid) - dcpu0) if dpid else 0.0
    ok = [t for t in done.values() if t.status == agent_pb2.SUCCESS]
    start = min(t.started_at.ToNanoseconds() for t in done.values())
    end = max(t.ended_at.ToNanoseconds() for t in done.values())
    span = (end - start) / 1e9
    packets = len(ok) * PACKETS
    per_task = sorted(
        PACKETS / ((t.ended_at.ToNanoseconds() - t.started_at.ToNanoseconds()) / 1e9) for t in ok
    )
    return {
        "name": name,
        "packets": packets,
        "span_s": span,
        "pps": packets / span if span > 0 else 0.0,
        "writer_cpu_s": cpu,
        "writer_cpu_share": cpu / wall,
        "dispatcher_cpu_s": dcpu,
        "dispatcher_cpu_share": dcpu / wall,
        "per_session_pps_p50": per_task[len(per_task) // 2] if per_task else 0.0,
        "ok_tasks": len(ok),
        "tasks": len(ids),
        "wall_s": wall,
    }


def measure(role: str) -> dict[str, Any]:
    proc = spawn_self(__file__, "--role", role)
    # py-spy (BENCH_PYSPY) is attached to the writer, not to its parent.
    spy = start_pyspy(proc.pid, role)
    try:
        return asyncio.run(drive(proc.pid, role))
    finally:
        stop_pyspy(spy)
        stop_process(proc)


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument(
        "--role", choices=["driver", "commander", "raw", "raw-batched"], default="driver"
    )
    ap.add_argument(
        "--only", choices=["commander", "raw", "raw-batched"], help="measure one writer"
    )
    args = ap.parse_args()
    if args.role == "commander":
        run_flood_commander()
        return 0
    if args.role in ("raw", "raw-batched"):
        run_raw(args.role == "raw-batched")
        return 0
    roles = [args.only] if args.only else ["raw", "raw-batched", "commander"]
    res = {role: measure(role) for role in roles}
    values = []
    for role, r in res.items():
        who = WHO[role]
        print(
            f"{who}: {r['pps']:.0f} packets/s ({r['packets']} packets in {r['span_s']:.2f} s, "
            f"writer CPU {r['writer_cpu_share']:.0%} of a core, "
            f"dispatcher CPU {r['dispatcher_cpu_share']:.0%}, "
            f"per session p50 {r['per_session_pps_p50']:.0f}/s, "
            f"{r['ok_tasks']}/{r['tasks']} tasks ok)",
            file=sys.stderr,
        )
        values += [
            value(f"{who}: upstream packets/s", round(r["pps"], 1), "packets/s"),
            value(f"{who}: writer CPU", round(r["writer_cpu_share"] * 100, 1), "% of a core"),
            value(
                f"{who}: writer CPU per packet",
                round(r["writer_cpu_s"] / max(r["packets"], 1) * 1e6, 2),
                "us",
            ),
        ]
    checks = [
        check(
            f"{role}: every task SUCCESS",
            r["ok_tasks"] == r["tasks"],
            f"{r['ok_tasks']}/{r['tasks']}",
        )
        for role, r in res.items()
    ]
    for raw in ("raw-batched", "raw"):
        if raw in res and "commander" in res and res[raw]["pps"] > 0:
            ratio = res["commander"]["pps"] / res[raw]["pps"]
            print(f"real commander / {WHO[raw]} = {ratio:.2f}", file=sys.stderr)
            values.append(value(f"real commander / {WHO[raw]}", round(ratio, 3), "ratio"))
    params = {
        "slots": SLOTS,
        "tasks": TASKS,
        "packets_per_task": PACKETS,
        "packet_bytes": PACKET_BYTES,
    }
    result = make_result(
        "python-ceiling", f"py-ceiling@{SLOTS}", params, values=values, checks=checks
    )
    return write_result(result)


if __name__ == "__main__":
    sys.exit(main())
