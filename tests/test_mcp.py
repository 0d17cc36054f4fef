"""MCP both ways, with the official Python `mcp` SDK as the peer.

In: a stdio MCP server (tests/_mcp_server.py) named in --mcp-servers is a tool
provider; a planner (the scripted model) calls its tools through the broker as
mcp.t.<tool>. A stop mid-call reaches the server (it records the
cancellation); the server killed mid-call fails that call and the next ones
at once with PROVIDER_UNAVAILABLE, then it is started again and used again.

Out: an MCP client (streamable HTTP, bearer token) against our /mcp lists the
tools, runs run_task with progress notifications, and cancels a run_task by
giving up the call (its stream closes): the task is cancelled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from commander._gen.dispatch.v1 import interaction_pb2, tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, start_watch, watch_all
from tests._procs import PYTHON, ROOT, wait_until
from tests.conftest import Stack
from tests.scripted import tool_call

pytestmark = pytest.mark.e2e

TOKEN = "mcp-test-client-token"
WENT_ON = "The planner went on after the tool."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerLog:
    """The MCP server's record of what it saw (see tests/_mcp_server.py)."""

    def __init__(self, path: Path):
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def has(self, prefix: str, tag: str) -> bool:
        return any(x.startswith(prefix + " ") and x.endswith(" " + tag) for x in self.lines())

    def pids(self) -> list[int]:
        return [int(x.split()[1]) for x in self.lines() if x.startswith("START ")]


@pytest.fixture(scope="module")
def env(module_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("mcp")
    log = ServerLog(work / "server.log")
    servers = work / "servers.json"
    servers.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "t": {
                        "command": PYTHON,
                        "args": ["-m", "tests._mcp_server"],
                        "cwd": str(ROOT),
                        "env": {"MCP_TEST_LOG": str(log.path), "PYTHONPATH": str(ROOT)},
                        "timeout": "60s",
                    }
                }
            }
        )
    )
    fast = module_stack.scripted(
        [{"tool_calls": [tool_call("mcp.t.fast", {"text": "hello"})]}, {"content": WENT_ON}]
    )
    stop = module_stack.scripted([{"tool_calls": [tool_call("mcp.t.slow", {"tag": "stop-1"})]}])
    kill = module_stack.scripted(
        [{"tool_calls": [tool_call("mcp.t.slow", {"tag": "kill-1"})]}, {"content": WENT_ON}]
    )
    denied = module_stack.scripted(
        [{"tool_calls": [tool_call("mcp.t.slow", {"tag": "denied-1"})]}, {"content": WENT_ON}]
    )
    policy = work / "policy.yaml"
    policy.write_text(
        "version: 1\nrules:\n"
        "  - {id: no-denied-tags, action: deny, reason: tag refused,\n"
        '     when: \'tool_name == "mcp.t.slow" && tool_args.tag.startsWith("denied")\'}\n'
    )
    # The commander's own model (run_task names none): 200 tokens at 40/s.
    default = module_stack.scripted(tokens_per_sec=40, tokens=200)
    http_port = free_port()
    d = module_stack.dispatcher(
        "--mcp-servers",
        str(servers),
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--storage-backend",
        "memory",
        "--policy-file",
        str(policy),
        client_token=TOKEN,
    )
    wait_until(
        lambda: {"mcp.t.fast", "mcp.t.slow"} <= d.tool_names(),
        30,
        "the MCP server's tools brokered",
        procs=[d.proc],
    )
    module_stack.commander(d, default.base_url, slots=2, wait_slots=2)
    return SimpleNamespace(
        d=d,
        log=log,
        fast=fast,
        stop=stop,
        kill=kill,
        denied=denied,
        url=f"http://127.0.0.1:{http_port}/mcp",
    )


def tool_results(events: list[tasks_pb2.TaskEvent]) -> list[tasks_pb2.ToolResultEvent]:
    return [e.tool_result for e in events if kind(e) == "tool_result"]


def code(r: tasks_pb2.ToolResultEvent) -> str:
    if not r.result.HasField("error"):
        return "OK"
    return interaction_pb2.ToolErrorCode.Name(r.result.error.code).removeprefix("TOOL_ERROR_CODE_")


def test_planner_calls_an_mcp_tool(env: SimpleNamespace) -> None:
    d = env.d
    task_id = d.submit(f"call the fast tool [{uuid.uuid4().hex[:8]}]", env.fast)
    events = watch_all(d.tasks, task_id, timeout=30)
    (res,) = tool_results(events)
    assert code(res) == "OK", describe(events)
    assert res.executor == "mcp.t", res
    assert res.result.tool_name == "mcp.t.fast"
    out = json.loads(res.result.result_json)
    assert out["echo"] == "hello" and out["pid"] == env.log.pids()[-1], out
    assert kind(events[-1]) == "state" and events[-1].state.status == agent_pb2.SUCCESS


def test_tools_listed_with_their_schemas(env: SimpleNamespace) -> None:
    resp = env.d.tasks.ListTools(tasks_pb2.ListToolsRequest(), timeout=5)
    by_name = {t.name: (t, e) for t, e in zip(resp.tools, resp.executors, strict=True)}
    spec, executor = by_name["mcp.t.slow"]
    assert executor == "mcp.t"
    schema = json.loads(spec.parameters_json_schema)
    assert schema["type"] == "object" and "tag" in schema["properties"], schema
    assert "tag" in schema.get("required", []), schema
    assert spec.timeout_ms == 60_000


def test_policy_denies_an_mcp_tool_call(env: SimpleNamespace) -> None:
    d = env.d
    task_id = d.submit(f"a denied call [{uuid.uuid4().hex[:8]}]", env.denied)
    events = watch_all(d.tasks, task_id, timeout=30)
    (res,) = tool_results(events)
    assert code(res) == "DENIED" and "tag refused" in res.result.error.message, describe(events)
    assert events[-1].state.status == agent_pb2.SUCCESS, describe(events)
    assert not env.log.has("SLOW_BEGIN", "denied-1"), "a denied call reached the MCP server"


def test_stop_mid_call_reaches_the_mcp_server(env: SimpleNamespace) -> None:
    d = env.d
    task_id = d.submit(f"wait on the slow tool [{uuid.uuid4().hex[:8]}]", env.stop)
    watch = start_watch(d.tasks, task_id)
    wait_until(lambda: env.log.has("SLOW_BEGIN", "stop-1"), 30, "slow running", procs=[d.proc])
    t0 = time.monotonic()
    resp = d.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task_id), timeout=10)
    assert resp.cancelled, resp
    wait_until(
        lambda: env.log.has("SLOW_CANCELLED", "stop-1"),
        5,
        "the MCP server saw the cancel",
        procs=[d.proc],
    )
    took = time.monotonic() - t0
    print(f"\nstop → MCP server cancelled the call in {took * 1000:.0f} ms")
    watch.join(10)
    events = watch.values()
    assert kind(events[-1]) == "state" and events[-1].state.status == agent_pb2.CANCELLED
    (res,) = tool_results(events)
    assert code(res) == "CANCELLED", describe(events)
    assert not env.log.has("SLOW_DONE", "stop-1")


def test_killed_server_fails_calls_then_restarts(env: SimpleNamespace) -> None:
    d = env.d
    task_id = d.submit(f"slow tool, server killed [{uuid.uuid4().hex[:8]}]", env.kill)
    wait_until(lambda: env.log.has("SLOW_BEGIN", "kill-1"), 30, "slow running", procs=[d.proc])
    old = env.log.pids()[-1]
    os.kill(old, signal.SIGKILL)
    events = watch_all(d.tasks, task_id, timeout=30)
    (res,) = tool_results(events)
    assert code(res) == "PROVIDER_UNAVAILABLE", describe(events)
    # The session went on and finished.
    after = "".join(e.content.text for e in events if kind(e) == "content")
    assert after == WENT_ON, describe(events)
    assert events[-1].state.status == agent_pb2.SUCCESS

    # Started again (a new process), and used again by a planner.
    wait_until(lambda: env.log.pids()[-1] != old, 30, "the MCP server restarted", procs=[d.proc])
    new = env.log.pids()[-1]
    deadline = time.monotonic() + 30
    while True:
        task_id = d.submit(f"call the fast tool again [{uuid.uuid4().hex[:8]}]", env.fast)
        events = watch_all(d.tasks, task_id, timeout=30)
        (res,) = tool_results(events)
        if code(res) == "OK":
            break
        # Restarted but not yet connected: the call failed at once.
        assert code(res) == "PROVIDER_UNAVAILABLE", describe(events)
        assert time.monotonic() < deadline, "the restarted MCP server never answered"
    assert json.loads(res.result.result_json)["pid"] == new


# ------------------------------------------------------------------ /mcp


def client(env: SimpleNamespace, token: str = TOKEN, mode: str = "auto") -> Client:
    """An MCP client of /mcp; mode "auto" negotiates 2026-07-28, "legacy" the
    initialize handshake (2025-11-25)."""
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=120)
    )
    return Client(streamable_http_client(env.url, http_client=http), mode=mode)


def test_mcp_client_lists_and_calls_tools(env: SimpleNamespace) -> None:
    async def main() -> None:
        async with client(env) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert {"run_task", "calculator", "mcp.t.fast", "mcp.t.slow"} <= names, names
            r = await c.call_tool("calculator", {"expression": "6 * 7"})
            assert not r.is_error and r.structured_content is not None, r
            assert r.structured_content["result"] == 42, r
            # An MCP server's tool, brokered, served out again.
            r = await c.call_tool("mcp.t.fast", {"text": "round trip"})
            assert not r.is_error and r.structured_content is not None, r
            assert r.structured_content["echo"] == "round trip", r
            r = await c.call_tool("calculator", {"nope": 1})
            assert r.is_error, r
            # The policy applies to MCP clients' calls as to planners'.
            r = await c.call_tool("mcp.t.slow", {"tag": "denied-2"})
            assert r.is_error and "no-denied-tags" in str(r.content), r

    anyio.run(main)


def test_mcp_needs_the_client_token(env: SimpleNamespace) -> None:
    async def main() -> None:
        async with httpx2.AsyncClient() as http:
            resp = await http.post(
                env.url,
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
                headers={"Accept": "application/json, text/event-stream"},
            )
            assert resp.status_code == 401, resp.text
            assert resp.headers["www-authenticate"].startswith("Bearer")

    anyio.run(main)


def test_run_task_with_progress(env: SimpleNamespace) -> None:
    marker = uuid.uuid4().hex[:8]
    seen: list[tuple[float, str]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message or ""))

    async def main() -> None:
        async with client(env) as c:
            r = await c.call_tool(
                "run_task",
                {"instruction": f"say something [{marker}]"},
                progress_callback=on_progress,
            )
            assert not r.is_error, r
            sc = r.structured_content
            assert sc is not None and sc["status"] == "success", r
            assert sc["result"], r
            env.run_task_id = sc["task_id"]

    anyio.run(main)
    assert seen, "no progress notifications"
    assert seen[0] == (0, f"task {env.run_task_id}"), seen[:3]
    values = [p for p, _ in seen]
    assert values == sorted(values) and len(set(values)) == len(values), values
    assert any(m.startswith("content: ") for _, m in seen), seen
    assert seen[-1][1].startswith("status success"), seen[-3:]
    got = env.d.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=env.run_task_id), timeout=5)
    assert got.task.status == agent_pb2.SUCCESS
    assert f"[{marker}]" in got.task.instruction


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_run_task_cancelled_by_closing(env: SimpleNamespace, mode: str) -> None:
    marker = uuid.uuid4().hex[:8]
    task_ids: list[str] = []
    given_up: list[float] = []
    content = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        m = message or ""
        if m.startswith("task "):
            task_ids.append(m.removeprefix("task "))
        if m.startswith("content: "):
            content.set()

    async def main() -> None:
        async with client(env, mode=mode) as c:
            want = "2026-07-28" if mode == "auto" else "2025-11-25"
            assert c.protocol_version == want, c.protocol_version
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    await c.call_tool(
                        "run_task",
                        {"instruction": f"talk [{marker}]"},
                        progress_callback=on_progress,
                    )
                    raise AssertionError("run_task ended before it was cancelled")

                tg.start_soon(call)
                with anyio.fail_after(30):
                    await content.wait()
                given_up.append(time.monotonic())
                tg.cancel_scope.cancel()  # give up the call: its stream closes

    anyio.run(main)
    (task_id,) = task_ids
    d = env.d

    def status() -> int:
        got = d.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id), timeout=5)
        return int(got.task.status)

    wait_until(lambda: status() == agent_pb2.CANCELLED, 10, "the task cancelled", procs=[d.proc])
    took = time.monotonic() - given_up[0]
    print(f"\nMCP client ({mode}) gave up run_task → task CANCELLED within {took * 1000:.0f} ms")
    events = watch_all(d.tasks, task_id, timeout=10)
    assert "stop" in [kind(e) for e in events], describe(events)
