"""Issue 15: a tool call's round trip to an MCP server vs to our own tool provider.

One dispatcher (bin/dispatcher, or $DISPATCH_BIN) with two Python tool
executors doing the same work (SHA-256 of a short text):

- ``provider``: ``text.sha256`` of our gRPC tool provider (``python -m
  commander.tools_main``, ToolProviderService.Connect);
- ``mcp``: ``mcp.b.sha256`` of a stdio MCP server built with the official
  ``mcp`` SDK (tests/_mcp_server.py), named in --mcp-servers;
- ``builtin``: the dispatcher's own ``echo`` (no provider at all), the
  baseline.

A client drives every call through the dispatcher's /mcp endpoint (one
``mcp`` SDK client, streamable HTTP, calls one at a time, the three tools
interleaved so that they share the machine's noise); what differs between
the rows is only the broker → executor → broker leg, so ``row - builtin``
is that leg's cost. Result lines in loadgen's ``--json`` shape go to
$BENCH_RESULTS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx2
from _benchlib import QUICK, check, latency_summary, make_result, md, write_result
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CALLS = int(os.environ.get("BENCH_MCP_CALLS", "300" if QUICK else "1500"))
WARMUP = 30
CLIENT_TOKEN = "bench-client-token"
COMMANDER_TOKEN = "bench-commander-token"
TOOLS = {"builtin": "echo", "provider": "text.sha256", "mcp": "mcp.b.sha256"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(0.05)


async def measure(url: str) -> dict[str, list[float]]:
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}, timeout=httpx2.Timeout(30)
    )
    out: dict[str, list[float]] = {k: [] for k in TOOLS}
    async with Client(streamable_http_client(url, http_client=http)) as c:
        for i in range(WARMUP + CALLS):
            for row, tool in TOOLS.items():
                args = {"text": f"bench {i}"}
                t0 = time.perf_counter()
                r = await c.call_tool(tool, args)
                ms = (time.perf_counter() - t0) * 1000
                if r.is_error:
                    raise RuntimeError(f"{tool}: {r.content}")
                if i >= WARMUP:
                    out[row].append(ms)
    return out


def main() -> int:
    exe = os.environ.get("DISPATCH_BIN") or str(ROOT / "bin" / "dispatcher")
    with tempfile.TemporaryDirectory(prefix="bench-mcp-") as tmp:
        work = Path(tmp)
        servers = work / "servers.json"
        servers.write_text(
            json.dumps(
                {
                    "mcpServers": {
                        "b": {
                            "command": PYTHON,
                            "args": ["-m", "tests._mcp_server"],
                            "cwd": str(ROOT),
                            "env": {"MCP_TEST_LOG": str(work / "mcp.log"), "PYTHONPATH": str(ROOT)},
                        }
                    }
                }
            )
        )
        http_port = free_port()
        addr_file = work / "addr"
        procs: list[subprocess.Popen[bytes]] = []
        log = open(work / "dispatcher.log", "wb")
        try:
            procs.append(
                subprocess.Popen(
                    [
                        exe,
                        "--listen",
                        "127.0.0.1:0",
                        "--addr-file",
                        str(addr_file),
                        "--http-listen",
                        f"127.0.0.1:{http_port}",
                        "--storage-backend",
                        "memory",
                        "--client-token",
                        CLIENT_TOKEN,
                        "--commander-token",
                        COMMANDER_TOKEN,
                        "--mcp-servers",
                        str(servers),
                        "--log-level",
                        "warn",
                    ],
                    stdout=log,
                    stderr=log,
                )
            )
            addr = wait(
                lambda: addr_file.exists() and addr_file.read_text().strip(), 30, "dispatcher"
            )
            procs.append(
                subprocess.Popen(
                    [
                        PYTHON,
                        "-m",
                        "commander.tools_main",
                        "--dispatcher",
                        addr,
                        "--root",
                        str(work / "ws"),
                        "--token",
                        COMMANDER_TOKEN,
                    ],
                    cwd=ROOT,
                    stdout=log,
                    stderr=log,
                )
            )
            with grpc.insecure_channel(addr) as ch:
                stub = tasks_pb2_grpc.TaskServiceStub(ch)

                def listed() -> bool:
                    resp = stub.ListTools(
                        tasks_pb2.ListToolsRequest(), metadata=md(CLIENT_TOKEN), timeout=5
                    )
                    return set(TOOLS.values()) <= {t.name for t in resp.tools}

                try:
                    wait(listed, 60, "the provider's and the MCP server's tools")
                except TimeoutError:
                    log.flush()
                    sys.stderr.write((work / "dispatcher.log").read_text()[-3000:])
                    raise
            lat = anyio.run(measure, f"http://127.0.0.1:{http_port}/mcp")
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            log.close()

    summaries = {row: latency_summary(xs) for row, xs in lat.items()}
    for row, s in summaries.items():
        print(
            f"{row:8} {TOOLS[row]:14} n={s['n']} p50={s['p50_ms']:.2f} ms "
            f"p99={s['p99_ms']:.2f} ms (leg over builtin: p50 "
            f"{s['p50_ms'] - summaries['builtin']['p50_ms']:+.2f} ms)",
            file=sys.stderr,
        )
    result = make_result(
        "mcp-vs-provider",
        "mcp-vs-provider",
        {"calls": CALLS, "client": "mcp SDK over /mcp", "work": "sha256 of a short text"},
        latencies=[
            {"name": f"{row}: /mcp → {TOOLS[row]} round trip", "summary": s}
            for row, s in summaries.items()
        ],
        checks=[check("every call answered", all(len(x) == CALLS for x in lat.values()), "")],
    )
    return write_result(result)


if __name__ == "__main__":
    sys.exit(main())
