"""A2A streaming vs our native WatchTask: the same events, three ways to watch them.

A raw commander slot in this process streams EVENTS content events (token-sized
text, paced at RATE/s) for one task; one client follows the task with

- ``native``: ``dispatch.v1.TaskService/WatchTask`` (grpc.aio);
- ``a2a-grpc``: A2A ``SubscribeToTask`` over the gRPC binding (a2a-sdk client);
- ``a2a-jsonrpc``: A2A ``SubscribeToTask`` over JSON-RPC + SSE at /a2a (a2a-sdk client).

Each way gets its own task on the same dispatcher (started here, with
--http-listen on a free port). The client is subscribed before the first
content event is written. Figures per way:

- server CPU per event: utime+stime of the dispatcher (/proc) from the first
  write to the last event received, / events. It includes what every way
  shares (ingest, policy, event log, store), so the difference between the
  ways is the cost of the transport and of the A2A projection;
- relay p50/p99: from the commander's write (the send time is in the text) to
  the client having the event decoded (one clock: this process).

    .venv/bin/python scripts/bench_a2a.py          (BENCH_QUICK=1: fewer events)

Result lines in loadgen's ``--json`` shape go to $BENCH_RESULTS.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from _benchlib import (
    QUICK,
    arg_parser,
    check,
    cpu_seconds,
    latency_summary,
    make_result,
    next_start,
    open_slot,
    stop_process,
    value,
    wait_for_slots,
    write_result,
)
from a2a.client import ClientConfig, ClientFactory
from a2a.types.a2a_pb2 import SubscribeToTaskRequest

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
EVENTS = 500 if QUICK else 3000
RATE = 500.0  # events/s
WAYS = ("native", "a2a-grpc", "a2a-jsonrpc")


def start_dispatcher(workdir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    exe = os.environ.get("BENCH_DISPATCHER") or str(ROOT / "bin" / "dispatcher")
    addr_file = workdir / "dispatcher.addr"
    log = open(workdir / "dispatcher.log", "wb")  # the process's log, open while it runs
    proc = subprocess.Popen(
        [exe, "--listen", "127.0.0.1:0", "--addr-file", str(addr_file),
         "--http-listen", "127.0.0.1:0", "--data-dir", str(workdir / "data"),
         "--queue-size", "1000", "--log-format", "text"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = (workdir / "dispatcher.log").read_text(errors="replace")
        m = re.search(r'msg="http api serving" addr=(\S+)', text)
        if addr_file.exists() and addr_file.read_text().strip() and m:
            return proc, addr_file.read_text().split()[0], m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"dispatcher exited:\n{text}")
        time.sleep(0.05)
    raise RuntimeError("dispatcher did not start")


async def produce(call: Any, sid: str, go: asyncio.Event) -> None:
    """Writes EVENTS content packets at RATE/s, each holding its send time, then SUCCESS."""
    await go.wait()
    start = time.monotonic()
    for i in range(EVENTS):
        due = start + i / RATE
        if (lag := due - time.monotonic()) > 0:
            await asyncio.sleep(lag)
        text = f"{time.time():.6f} token{i % 97:02d} "
        await call.write(ipb.UpstreamPacket(session_id=sid, content=ipb.ContentChunk(text=text)))
    result = ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="done")
    await call.write(ipb.UpstreamPacket(session_id=sid, result=result))


def sent_at(text: str) -> float:
    return float(text.split(" ", 1)[0])


async def follow(
    way: str, task_id: str, grpc_addr: str, base: str, go: asyncio.Event
) -> list[float]:
    """Follows the task the given way; returns the relay latencies in ms."""
    lat: list[float] = []
    if way == "native":
        async with grpc.aio.insecure_channel(grpc_addr) as ch:
            stub = tasks_pb2_grpc.TaskServiceStub(ch)
            call = stub.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task_id))
            async for resp in call:
                ev = resp.event
                if ev.WhichOneof("kind") == "content":
                    lat.append((time.time() - sent_at(ev.content.text)) * 1000)
                elif not go.is_set():
                    go.set()  # subscribed: the start's state events arrived
        return lat
    binding = "GRPC" if way == "a2a-grpc" else "JSONRPC"
    async with httpx.AsyncClient(timeout=120) as hc:
        factory = ClientFactory(
            ClientConfig(
                streaming=True,
                httpx_client=hc,
                supported_protocol_bindings=[binding],
                use_client_preference=True,
                grpc_channel_factory=grpc.aio.insecure_channel,
            )
        )
        client = await factory.create_from_url(base)
        async with client:
            async for ev in client.subscribe(SubscribeToTaskRequest(id=task_id)):
                kind = ev.WhichOneof("payload")
                if kind == "artifact_update":
                    now = time.time()
                    for p in ev.artifact_update.artifact.parts:
                        lat.append((now - sent_at(p.text)) * 1000)
                elif kind == "task":
                    go.set()  # the snapshot: subscribed
    return lat


async def run_way(
    way: str, ch: grpc.aio.Channel, grpc_addr: str, base: str, pid: int
) -> dict[str, Any]:
    call = await open_slot(ch, f"bench-a2a-{way}", ["planner:a2abench"])
    await wait_for_slots(ch, 1, "the bench slot")
    tasks = tasks_pb2_grpc.TaskServiceStub(ch)
    sub = await tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction=f"bench {way}", planner="a2abench")
    )
    start = await next_start(call)
    go = asyncio.Event()
    producer = asyncio.create_task(produce(call, start.session_id, go))
    cpu0 = -1.0

    async def mark() -> None:
        nonlocal cpu0
        await go.wait()
        cpu0 = cpu_seconds(pid)

    marker = asyncio.create_task(mark())
    t0 = time.monotonic()
    lat = await follow(way, sub.task_id, grpc_addr, base, go)
    cpu = cpu_seconds(pid) - cpu0
    wall = time.monotonic() - t0
    await producer
    await marker
    call.cancel()
    await asyncio.sleep(0.2)  # the slot leaves before the next way's slot counts
    return {"way": way, "lat": lat, "cpu": cpu, "wall": wall}


async def main() -> int:
    arg_parser(__doc__).parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-a2a-") as tmp:
        proc, grpc_addr, http_addr = start_dispatcher(Path(tmp))
        try:
            async with grpc.aio.insecure_channel(grpc_addr) as ch:
                runs = [
                    await run_way(w, ch, grpc_addr, f"http://{http_addr}", proc.pid) for w in WAYS
                ]
        finally:
            stop_process(proc)
    values, latencies, checks = [], [], []
    print(
        f"{'way':<12} {'events':>6} {'CPU µs/event':>13} {'p50 ms':>8} {'p99 ms':>8}",
        file=sys.stderr,
    )
    for r in runs:
        n = len(r["lat"])
        summary = latency_summary(r["lat"])
        per_event = r["cpu"] / max(n, 1) * 1e6
        print(
            f"{r['way']:<12} {n:>6} {per_event:>13.1f} "
            f"{summary['p50_ms']:>8.2f} {summary['p99_ms']:>8.2f}",
            file=sys.stderr,
        )
        values.append(value(f"{r['way']} server CPU per event", round(per_event, 1), "us"))
        latencies.append({"name": f"{r['way']} relay", "summary": summary})
        checks.append(check(f"{r['way']} got every event", n == EVENTS, f"{n}/{EVENTS}"))
    write_result(
        make_result(
            "a2a-vs-watch",
            "a2a-vs-watch",
            {"events": EVENTS, "rate": RATE},
            values=values,
            latencies=latencies,
            checks=checks,
        )
    )
    return 0 if all(c["pass"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
