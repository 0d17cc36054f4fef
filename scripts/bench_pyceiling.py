"""Issue 7 scenario 6: the Python commander's ceiling against raw grpc.aio.

Two writers, each one separate Python process with SLOTS ChatStreams to the
same dispatcher, measured the same way:

- ``commander``: the real :class:`commander.Commander` (public API only) with a
  ``flood`` planner, an async generator that yields ``ContentChunk`` packets
  as fast as the commander takes them;
- ``raw``: a minimal grpc.aio bidi client per slot (hello, wait for start,
  write ``UpstreamPacket{content}`` in a loop, then the result) — the floor
  any Python commander pays for grpc.aio itself.

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

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import interaction_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2

QUICK = os.environ.get("BENCH_QUICK") == "1"
SLOTS = int(os.environ.get("BENCH_PY_SLOTS", "4"))
PACKET_BYTES = 64
PACKETS = int(os.environ.get("BENCH_PY_PACKETS", "5000" if QUICK else "10000"))
TASKS = int(os.environ.get("BENCH_PY_TASKS", str(SLOTS * (2 if QUICK else 5))))
ADDR = os.environ.get("DISPATCHER_ADDR", "127.0.0.1:50051")
COMMANDER_TOKEN = os.environ.get("DISPATCHER_COMMANDER_TOKEN", "")
CLIENT_TOKEN = os.environ.get("DISPATCHER_CLIENT_TOKEN", "")
TEXT = "x" * PACKET_BYTES
TERMINAL = {agent_pb2.SUCCESS, agent_pb2.FAILURE, agent_pb2.CANCELLED}


def cpu_seconds(pid: int) -> float:
    """utime+stime of pid from /proc/PID/stat, in seconds (USER_HZ = 100)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def task_size(instruction: str) -> int:
    """Packets a task asks for: its instruction is ``flood <packets>``."""
    return int(instruction.split()[1])


# --- writer: the real commander ------------------------------------------------


def run_commander() -> None:
    from commander import Commander, ConnectionConfig, PlannerRegistry, SessionContext

    planners = PlannerRegistry()

    @planners.register("flood")
    async def flood(ctx: SessionContext):  # type: ignore[no-untyped-def]
        n = task_size(ctx.instruction)
        chunk = ipb.ContentChunk(text=TEXT)
        for _ in range(n):
            yield chunk
        yield ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result=f"{n} packets")

    async def main() -> None:
        commander = Commander(
            ConnectionConfig(target=ADDR, token=COMMANDER_TOKEN or None),
            slots=SLOTS,
            planners=planners,
            commander_id="bench-py-commander",
        )
        await commander.run()

    asyncio.run(main())


# --- writer: raw grpc.aio ------------------------------------------------------


async def raw_slot(index: int) -> None:
    # Like the commander: one channel (one HTTP/2 connection) per stream.
    async with grpc.aio.insecure_channel(
        ADDR, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as ch:
        call = interaction_pb2_grpc.AgentInteractionStub(ch).ChatStream(
            metadata=md(COMMANDER_TOKEN)
        )
        hello = ipb.Hello(
            commander_id="bench-py-raw",
            version="0",
            capabilities=["planner:flood"],
            slot_index=index,
        )
        await call.write(ipb.UpstreamPacket(hello=hello))
        while True:
            down = await call.read()
            if down is grpc.aio.EOF:
                return
            if down.WhichOneof("signal") != "start":
                continue
            sid = down.session_id
            n = task_size(down.start.instruction)
            chunk = ipb.ContentChunk(text=TEXT)
            for _ in range(n):
                await call.write(
                    ipb.UpstreamPacket(
                        session_id=sid, timestamp=time.time_ns() // 1000, content=chunk
                    )
                )
            await call.write(
                ipb.UpstreamPacket(
                    session_id=sid,
                    result=ipb.FinalResult(
                        outcome=ipb.SESSION_OUTCOME_SUCCESS, result=f"{n} packets"
                    ),
                )
            )


def run_raw() -> None:
    async def main() -> None:
        await asyncio.gather(*(raw_slot(i) for i in range(SLOTS)))

    asyncio.run(main())


# --- driver ----------------------------------------------------------------------


async def drive(writer_pid: int, name: str) -> dict[str, Any]:
    cmd = md(CLIENT_TOKEN)
    async with grpc.aio.insecure_channel(ADDR) as ch:
        agent = agent_pb2_grpc_stub(ch)
        deadline = time.monotonic() + 30
        while (
            await agent.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), metadata=cmd)
        ).maxConcurrentTasks < SLOTS:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: slots did not register within 30 s")
            await asyncio.sleep(0.05)
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


def agent_pb2_grpc_stub(ch: grpc.aio.Channel) -> Any:
    from commander._gen.lybic.agent import agent_pb2_grpc

    return agent_pb2_grpc.AgentStub(ch)


def measure(role: str, pyspy_dir: str | None) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", role])
    spy = None
    spy_bin = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if pyspy_dir and os.path.exists(spy_bin):
        # Attached to the writer (not its parent), stopped with SIGINT so that
        # it writes the profile; --nonblocking: the writer is not paused.
        os.makedirs(pyspy_dir, exist_ok=True)
        out = os.path.join(pyspy_dir, f"pyspy-{role}")
        spy = subprocess.Popen(
            [spy_bin, "record", "--rate", "250", "--nonblocking", "--format", "raw",
             "-o", out + ".txt", "--pid", str(proc.pid)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        return asyncio.run(drive(proc.pid, role))
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--role", choices=["driver", "commander", "raw"], default="driver")
    ap.add_argument("--only", choices=["commander", "raw"], help="measure one writer")
    args = ap.parse_args()
    if args.role == "commander":
        run_commander()
        return 0
    if args.role == "raw":
        run_raw()
        return 0
    pyspy_dir = os.environ.get("BENCH_PYSPY") or None
    roles = [args.only] if args.only else ["raw", "commander"]
    res = {role: measure(role, pyspy_dir) for role in roles}
    values = []
    for role, r in res.items():
        who = "real commander" if role == "commander" else "raw grpc.aio"
        print(
            f"{who}: {r['pps']:.0f} packets/s ({r['packets']} packets in {r['span_s']:.2f} s, "
            f"writer CPU {r['writer_cpu_share']:.0%} of a core, "
            f"dispatcher CPU {r['dispatcher_cpu_share']:.0%}, "
            f"per session p50 {r['per_session_pps_p50']:.0f}/s, "
            f"{r['ok_tasks']}/{r['tasks']} tasks ok)",
            file=sys.stderr,
        )
        values += [
            {
                "name": f"{who}: upstream packets/s",
                "value": round(r["pps"], 1),
                "unit": "packets/s",
            },
            {
                "name": f"{who}: writer CPU",
                "value": round(r["writer_cpu_share"] * 100, 1),
                "unit": "% of a core",
            },
            {
                "name": f"{who}: writer CPU per packet",
                "value": round(r["writer_cpu_s"] / max(r["packets"], 1) * 1e6, 2),
                "unit": "us",
            },
        ]
    checks = [
        {
            "name": f"{role}: every task SUCCESS",
            "pass": r["ok_tasks"] == r["tasks"],
            "detail": f"{r['ok_tasks']}/{r['tasks']}",
        }
        for role, r in res.items()
    ]
    if "raw" in res and "commander" in res and res["raw"]["pps"] > 0:
        ratio = res["commander"]["pps"] / res["raw"]["pps"]
        print(f"commander / raw grpc.aio = {ratio:.2f}", file=sys.stderr)
        values.append(
            {"name": "real commander / raw grpc.aio", "value": round(ratio, 3), "unit": "ratio"}
        )
    result = {
        "scenario": "python-ceiling",
        "label": f"py-ceiling@{SLOTS}",
        "params": {
            "slots": SLOTS,
            "tasks": TASKS,
            "packets_per_task": PACKETS,
            "packet_bytes": PACKET_BYTES,
        },
        "values": values,
        "checks": checks,
        "ok": all(c["pass"] for c in checks),
    }
    if path := os.environ.get("BENCH_RESULTS"):
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
