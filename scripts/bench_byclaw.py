"""Issue 16, "a peer, side by side": seed 003's engine beside our relay path.

The same stream both ways, one after the other in this run: EVENTS token-sized
chunks (scripts/bench_rest.py's ``synthetic_events``) emitted at RATE per
second by

- ``byclaw``: a ``GatewayWorker`` of byclaw-gateway-sdk 0.1.1 from PyPI
  (scripts/bench_byclaw_worker.py, in .venv-byclaw) calling
  ``context.emit_chunk`` → Debian's redis-server (scripts/redis.sh) → a
  consumer in this process reading the session's data stream (``XREAD
  BLOCK``, as the SDK's "backend" does);
- ``ours``: a ``commander.Commander`` (child process) whose planner yields
  ``ContentChunk``\\ s → the dispatcher (scripts/bench.sh's, default store) →
  a ``WatchTask`` consumer in this process. Chunks that wait together for the
  commander's stream are folded into one packet (one event, the first chunk's
  timestamp), so "ours" may have fewer latency samples than chunks.

Relay latency: emit (the worker's ``time.time_ns()`` in the chunk's metadata;
the commander's packet timestamp) → the consumer has the event, p50/p99.
CPU per event: utime+stime (/proc, 10 ms ticks) of producer + broker +
consumer (worker + redis-server + this process; commander + dispatcher + this
process) from the request to the last event, / EVENTS. Reported with the
byclaw / ours ratios; one result line in loadgen's shape goes to
$BENCH_RESULTS. Environment: DISPATCHER_ADDR, DISPATCHER_PID and the tokens
(scripts/bench.sh's python_driver), BENCH_QUICK=1 (fewer events),
BENCH_BYCLAW_EVENTS, BENCH_BYCLAW_RATE.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aredis
from _benchlib import (
    ADDR,
    CLIENT_TOKEN,
    QUICK,
    arg_parser,
    check,
    cpu_seconds,
    latency_summary,
    make_result,
    md,
    run_commander,
    spawn_self,
    stop_process,
    value,
    wait_for_slots,
    write_result,
)
from bench_rest import synthetic_events

from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2
from commander.byclaw import _protocol as proto

ROOT = Path(__file__).resolve().parent.parent
EVENTS = int(os.environ.get("BENCH_BYCLAW_EVENTS", "1000" if QUICK else "5000"))
RATE = float(os.environ.get("BENCH_BYCLAW_RATE", "500"))


def log(msg: str) -> None:
    print(f"bench_byclaw: {msg}", file=sys.stderr, flush=True)


# --- ours: the commander process --------------------------------------------------


def commander_main() -> None:
    """The child process: a Commander with the bench_stream planner, one slot."""
    from commander import PlannerRegistry, SessionContext
    from commander._gen.dispatch.v1 import interaction_pb2 as ipb

    async def bench_stream(ctx: SessionContext) -> AsyncIterator[ipb.ContentChunk]:
        params = json.loads(ctx.instruction)
        n, rate = int(params["events"]), float(params["rate"])
        start = time.monotonic()
        for i, text in enumerate(synthetic_events(n)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield ipb.ContentChunk(text=text)

    run_commander(PlannerRegistry({"bench_stream": bench_stream}), 1, "bench-byclaw-ours")


async def run_ours(commander_pid: int) -> dict[str, Any]:
    dispatcher_pid = int(os.environ["DISPATCHER_PID"])
    pids = [commander_pid, dispatcher_pid, os.getpid()]
    lat: list[float] = []
    texts: list[str] = []
    status = ""
    async with grpc.aio.insecure_channel(ADDR) as ch:
        await wait_for_slots(ch, 1, "the bench commander")
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        meta = md(CLIENT_TOKEN)
        cpu0 = [cpu_seconds(p) for p in pids]
        req = tasks_pb2.SubmitTaskRequest(
            instruction=json.dumps({"events": EVENTS, "rate": RATE}), planner="bench_stream"
        )
        task_id = (await stub.SubmitTask(req, metadata=meta)).task_id
        async for ev in stub.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task_id), metadata=meta):
            e = ev.event
            now_us = time.time_ns() // 1000
            kind = e.WhichOneof("kind")
            if kind == "content":
                texts.append(e.content.text)
                if e.emitted_at_us:
                    lat.append((now_us - e.emitted_at_us) / 1000)
            elif kind == "state":
                status = agent_pb2.TaskStatus.Name(e.state.status)
        cpu1 = [cpu_seconds(p) for p in pids]
    parts = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    return {"lat": lat, "texts": texts, "cpu": sum(parts), "parts": parts, "status": status}


# --- byclaw: worker + redis-server + consumer ------------------------------------------


async def run_byclaw(port: int, worker_pid: int, redis_pid: int) -> dict[str, Any]:
    pids = [worker_pid, redis_pid, os.getpid()]
    client = aredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    lat: list[float] = []
    texts: list[str] = []
    done = ""
    try:
        session = f"bench-{uuid.uuid4().hex[:8]}"
        data = proto.session_data_stream(session)
        entry = proto.ask_agent_payload(
            capability="bench_stream",
            message_id=f"msg-{session}",
            session_id=session,
            content="bench",
            extra_payload={"events": EVENTS, "rate": RATE},
        )
        cpu0 = [cpu_seconds(p) for p in pids]
        await client.xadd(proto.ctrl_stream("bench_stream"), entry)  # type: ignore[arg-type]
        last = "0-0"
        while not done:
            res: Any = await client.xread({data: last}, count=512, block=10_000)
            if not res:
                done = "timeout: no entry for 10 s"
                break
            for _stream, entries in res:
                for entry_id, fields in entries:
                    now_ns = time.time_ns()
                    last = entry_id
                    # One JSON decode per entry, as a minimal backend would.
                    msg = json.loads(fields["data"])
                    body = msg["data"]
                    content = body["choices"][0]["delta"]["content"] or ""
                    if body["contentType"] == proto.CT_TEXT:
                        texts.append(content)
                        if t_ns := msg["metadata"].get("t_ns"):
                            lat.append((now_ns - int(t_ns)) / 1e6)
                    elif body["contentType"] == proto.CT_THINK_TITLE and (
                        content in (proto.STATE_COMPLETED, proto.STATE_CANCELLED)
                        or content.startswith(proto.STATE_FAILED)
                    ):
                        done = content
        cpu1 = [cpu_seconds(p) for p in pids]
    finally:
        await client.aclose()
    parts = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    return {"lat": lat, "texts": texts, "cpu": sum(parts), "parts": parts, "status": done}


def start_peer(tmp: Path) -> tuple[int, subprocess.Popen[bytes], int, dict[str, str]]:
    """redis-server and the worker; returns (port, worker, redis pid, redis.sh env)."""
    subprocess.run([str(ROOT / "scripts" / "byclaw_venv.sh")], check=True, timeout=600)
    env = {**os.environ, "REDIS_STATE_DIR": str(tmp / "redis")}
    url = subprocess.run(
        [str(ROOT / "scripts" / "redis.sh"), "start"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.strip()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    redis_pid = int((tmp / "redis" / "pid").read_text())
    worker = subprocess.Popen(
        [
            str(ROOT / ".venv-byclaw" / "bin" / "python"),
            str(ROOT / "scripts" / "bench_byclaw_worker.py"),
            str(port),
            "bench-worker",
            str(tmp / "workspace"),
        ],
        cwd=tmp,  # the SDK writes gateway-sdk.log to the working directory
        stdout=open(tmp / "worker.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    return port, worker, redis_pid, env


async def wait_worker(port: int, worker: subprocess.Popen[bytes]) -> None:
    client = aredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        deadline = time.monotonic() + 30
        while not await client.exists(proto.worker_lock("bench-worker")):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the byclaw bench worker did not register")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument(
        "--commander", action="store_true", help="internal: the commander child process"
    )
    args = parser.parse_args()
    if args.commander:
        commander_main()
        return 0
    expected = list(synthetic_events(EVENTS))
    params = {"events": EVENTS, "rate": RATE}
    with tempfile.TemporaryDirectory(prefix="bench-byclaw-") as tmpdir:
        tmp = Path(tmpdir)
        port, worker, redis_pid, redis_env = start_peer(tmp)
        try:
            asyncio.run(wait_worker(port, worker))
            log(f"byclaw: {EVENTS} chunks at {RATE:g}/s, worker -> redis-server -> XREAD")
            peer = asyncio.run(run_byclaw(port, worker.pid, redis_pid))
        finally:
            stop_process(worker)
            subprocess.run([str(ROOT / "scripts" / "redis.sh"), "stop"], env=redis_env, check=False)
    commander = spawn_self(__file__, "--commander")
    try:
        log(f"ours: {EVENTS} chunks at {RATE:g}/s, commander -> dispatcher -> WatchTask")
        ours = asyncio.run(run_ours(commander.pid))
    finally:
        stop_process(commander)

    lp, lo = latency_summary(peer["lat"]), latency_summary(ours["lat"])
    cpu_peer_us = peer["cpu"] / EVENTS * 1e6
    cpu_ours_us = ours["cpu"] / EVENTS * 1e6

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("nan")

    result = make_result(
        "byclaw-peer",
        "byclaw-peer",
        params,
        latencies=[
            {"name": "byclaw: worker emit_chunk -> Redis consumer", "summary": lp},
            {"name": "ours: commander emit -> WatchTask", "summary": lo},
        ],
        values=[
            value(
                "byclaw CPU per event (worker + redis-server + consumer)",
                round(cpu_peer_us, 1),
                "us",
            ),
            value(
                "ours CPU per event (commander + dispatcher + watcher)", round(cpu_ours_us, 1), "us"
            ),
            *(
                value(f"byclaw CPU per event: {name}", round(c / EVENTS * 1e6, 1), "us")
                for name, c in zip(
                    ("worker", "redis-server", "consumer"), peer["parts"], strict=True
                )
            ),
            *(
                value(f"ours CPU per event: {name}", round(c / EVENTS * 1e6, 1), "us")
                for name, c in zip(
                    ("commander", "dispatcher", "watcher"), ours["parts"], strict=True
                )
            ),
            value("byclaw / ours relay p50", ratio(lp["p50_ms"], lo["p50_ms"]), "x"),
            value("byclaw / ours relay p99", ratio(lp["p99_ms"], lo["p99_ms"]), "x"),
            value("byclaw / ours CPU per event", ratio(cpu_peer_us, cpu_ours_us), "x"),
        ],
        checks=[
            check(
                "byclaw consumer got every chunk, in order",
                peer["texts"] == expected and peer["status"] == proto.STATE_COMPLETED,
                f"{len(peer['texts'])}/{EVENTS} chunks, worker ended {peer['status']!r}",
            ),
            # The commander folds chunks that wait together for its stream into
            # one packet (one event): the text is checked, not the count.
            check(
                "our watcher got the whole text, in order",
                "".join(ours["texts"]) == "".join(expected) and ours["status"] == "SUCCESS",
                f"{len(ours['texts'])} content events for {EVENTS} chunks, "
                f"task state {ours['status']}",
            ),
        ],
    )
    log(
        f"relay p50/p99 ms: byclaw {lp['p50_ms']}/{lp['p99_ms']}, ours {lo['p50_ms']}/"
        f"{lo['p99_ms']}; CPU per event: byclaw {cpu_peer_us:.1f} us, ours {cpu_ours_us:.1f} us"
    )
    for c in result["checks"]:
        log(f"check {c['name']}: {'ok' if c['pass'] else 'FAILED'} ({c['detail']})")
    return write_result(result)


if __name__ == "__main__":
    sys.exit(main())
