"""Tenants stay apart end to end (issue 12, class 7).

A real dispatcher with a tenants file (team-a, team-b) and an admin token, and
two real commanders: team-a's connects with team-a's own commander token,
team-b's with the shared commander token and `--tenant team-b`. Each tenant's
tasks run only on its own commander; each tenant meets the other's tasks as
tasks that do not exist on gRPC (both APIs), on the HTTP API and through
dispatchctl; the admin sees everything, with each task's tenant.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2, agent_pb2_grpc
from tests import _procs
from tests._client import wait_status, watch_all
from tests._procs import wait_until
from tests.conftest import Dispatcher, Stack, _AuthInterceptor
from tests.scripted import tool_call

pytestmark = pytest.mark.e2e

TOKEN_A = "client-token-of-team-a"
TOKEN_B = "client-token-of-team-b"
ADMIN = "the-admin-token"
COMMANDER_A = "commander-token-of-team-a"
SHARED_COMMANDER = "the-shared-commander-token"


def sha256(token: str) -> str:
    # The documented one-liner: printf %s "$TOKEN" | sha256sum
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class Client:
    """gRPC stubs that present one client token."""

    def __init__(self, d: Dispatcher, token: str):
        self.channel = grpc.intercept_channel(
            grpc.insecure_channel(d.addr), _AuthInterceptor(token)
        )
        self.tasks = tasks_pb2_grpc.TaskServiceStub(self.channel)
        self.agent = agent_pb2_grpc.AgentStub(self.channel)

    def submit(self, instruction: str, config: agent_pb2.CommonConfig, previous: str = "") -> str:
        req = tasks_pb2.SubmitTaskRequest(instruction=instruction, previous_task_id=previous)
        req.running_config.CopyFrom(config)
        return str(self.tasks.SubmitTask(req, timeout=5).task_id)

    def listed(self) -> dict[str, tasks_pb2.Task]:
        resp = self.tasks.ListTasks(tasks_pb2.ListTasksRequest(page_size=1000), timeout=5)
        return {t.task_id: t for t in resp.tasks}


def code_of(call: Callable[..., object], *args: object, **kwargs: object) -> grpc.StatusCode:
    """The status code call(*args, **kwargs) fails with (a stream is read to its end)."""
    with pytest.raises(grpc.RpcError) as info:
        out = call(*args, **kwargs)
        if isinstance(out, Iterator):
            list(out)
    return info.value.code()  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(base: str, method: str, path: str, token: str, body: object = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def dispatchctl(d: Dispatcher, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = _procs.ensure_binary("dispatchctl")
    return subprocess.run(
        [str(exe), "--addr", d.addr, "--token", token, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_two_tenants_two_commanders_stay_apart(stack: Stack, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        f"  - name: team-a\n    tokens: ['{sha256(TOKEN_A)}']\n"
        f"    commander_tokens: ['{sha256(COMMANDER_A)}']\n"
        f"  - name: team-b\n    tokens: ['{sha256(TOKEN_B)}']\n"
    )
    llm = stack.scripted([{"content": "done"}])
    port = free_port()
    d = stack.dispatcher(
        "--http-listen",
        f"127.0.0.1:{port}",
        "--admin-token",
        ADMIN,
        "--tenants-file",
        str(tenants),
        commander_token=SHARED_COMMANDER,
    )
    d.client_token = ADMIN  # the fixture's own calls (slot counts) as the admin
    base = f"http://127.0.0.1:{port}"
    a, b, admin = Client(d, TOKEN_A), Client(d, TOKEN_B), Client(d, ADMIN)

    stack.commander(d, llm.base_url, slots=1, token=COMMANDER_A, commander_id="commander-a")
    stack.commander(
        d,
        llm.base_url,
        slots=1,
        token=SHARED_COMMANDER,
        commander_id="commander-b",
        env={**os.environ, "COMMANDER_TENANTS": "team-b"},
        wait_slots=2,
    )

    cfg = llm.model_config()
    a_ids = [a.submit(f"a {i}", cfg) for i in range(3)]
    b_ids = [b.submit(f"b {i}", cfg) for i in range(3)]
    for task_id in a_ids + b_ids:
        assert wait_status(admin.agent, task_id, timeout=60).status == agent_pb2.SUCCESS

    # Each tenant's tasks ran on its own commander only.
    everything = admin.listed()
    assert {everything[i].commander_id for i in a_ids} == {"commander-a"}, everything
    assert {everything[i].commander_id for i in b_ids} == {"commander-b"}, everything
    assert {everything[i].tenant for i in a_ids} == {"team-a"}
    assert {everything[i].tenant for i in b_ids} == {"team-b"}

    # Lists: each its own; the tenant is shown to the admin only.
    assert set(a.listed()) == set(a_ids)
    assert set(b.listed()) == set(b_ids)
    assert all(t.tenant == "" for t in a.listed().values())

    # team-b meets team-a's task as one that does not exist.
    foreign = a_ids[0]
    for task_id in (foreign, "no-such-task"):
        get = tasks_pb2.GetTaskRequest(task_id=task_id)
        assert code_of(b.tasks.GetTask, get, timeout=5) == grpc.StatusCode.NOT_FOUND
        watch = tasks_pb2.WatchTaskRequest(task_id=task_id)
        assert code_of(b.tasks.WatchTask, watch, timeout=5) == grpc.StatusCode.NOT_FOUND
        assert code_of(b.submit, "take over", cfg, previous=task_id) == grpc.StatusCode.NOT_FOUND
        status = b.agent.QueryTaskStatus(
            agent_pb2.QueryTaskStatusRequest(taskId=task_id), timeout=5
        )
        assert status.status == agent_pb2.NOT_FOUND and not status.result, status
        code, body = http(base, "GET", f"/api/tasks/{task_id}", TOKEN_B)
        assert code == 404, body
        code, body = http(
            base,
            "POST",
            "/api/agent/task/submit",
            TOKEN_B,
            {"instruction": "take over", "continue_context": True, "task_id": task_id},
        )
        assert code == 404, body
        out = dispatchctl(d, TOKEN_B, "status", task_id)
        assert out.returncode != 0 and "NotFound" in out.stderr + out.stdout, out
    assert dispatchctl(d, TOKEN_A, "status", foreign).returncode == 0
    listed = dispatchctl(d, TOKEN_B, "list")
    assert listed.returncode == 0 and foreign not in listed.stdout, listed
    assert "[team-a]" in dispatchctl(d, ADMIN, "list").stdout

    # team-a continues its own task, on its own commander.
    cont = a.submit("go on", cfg, previous=foreign)
    assert wait_status(admin.agent, cont, timeout=60).status == agent_pb2.SUCCESS
    assert admin.listed()[cont].commander_id == "commander-a"

    # Cancel-all over HTTP cancels only the caller's tasks. With the commanders
    # gone, new tasks wait in the queue.
    for p in list(stack.procs):
        if p.name.startswith("commander"):
            p.stop()
    wait_until(lambda: d.slots() == 0, 30, "the commanders gone", procs=[d.proc])
    pending_a = a.submit("wait a", cfg)
    pending_b = b.submit("wait b", cfg)
    code, body = http(base, "POST", "/api/agent/cancel", TOKEN_B, {})
    assert code == 200 and body["cancelled"] == [pending_b], body  # type: ignore[index]
    assert wait_status(admin.agent, pending_b, timeout=10).status == agent_pb2.CANCELLED
    status = a.agent.QueryTaskStatus(agent_pb2.QueryTaskStatusRequest(taskId=pending_a), timeout=5)
    assert status.status == agent_pb2.PENDING, status

    # The tenant survives a restart (it is part of the stored task).
    d2 = stack.restart_dispatcher(d)
    d2.client_token = ADMIN
    b2, admin2 = Client(d2, TOKEN_B), Client(d2, ADMIN)
    assert admin2.listed()[foreign].tenant == "team-a"
    assert set(b2.listed()) >= set(b_ids) and foreign not in b2.listed()
    get = tasks_pb2.GetTaskRequest(task_id=foreign)
    assert code_of(b2.tasks.GetTask, get, timeout=5) == grpc.StatusCode.NOT_FOUND


def test_the_workspace_keeps_tenants_apart(stack: Stack, tmp_path: Path) -> None:
    """One workspace provider serves every tenant's tasks: a file team-a's task
    writes is not there for team-b's, which reads and lists its own folder only."""
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        f"  - name: team-a\n    tokens: ['{sha256(TOKEN_A)}']\n"
        f"  - name: team-b\n    tokens: ['{sha256(TOKEN_B)}']\n"
    )
    # The scripted model answers by the turn of the conversation: one each.
    writer = stack.scripted(
        [
            {
                "tool_calls": [
                    tool_call("workspace.write_file", {"path": "s.txt", "content": "a's"})
                ]
            },
            {"content": "written"},
        ]
    )
    reader = stack.scripted(
        [{"tool_calls": [tool_call("workspace.read_file", {"path": "s.txt"})]}, {"content": "read"}]
    )
    d = stack.dispatcher(
        "--admin-token", ADMIN, "--tenants-file", str(tenants), commander_token=SHARED_COMMANDER
    )
    d.client_token = ADMIN
    workspace = tmp_path / "ws"
    stack.provider(d, workspace, token=SHARED_COMMANDER)
    stack.commander(d, writer.base_url, slots=1, token=SHARED_COMMANDER, wait_slots=1)
    a, b, admin = Client(d, TOKEN_A), Client(d, TOKEN_B), Client(d, ADMIN)
    wrote = a.submit("write it", writer.model_config())
    assert wait_status(admin.agent, wrote, timeout=60).status == agent_pb2.SUCCESS
    read = b.submit("read it", reader.model_config())
    assert wait_status(admin.agent, read, timeout=60).status == agent_pb2.SUCCESS

    results = [e.tool_result.result for e in watch_all(b.tasks, read) if e.HasField("tool_result")]
    assert len(results) == 1 and "no such file" in results[0].error.message, results
    written = [e.tool_result.result for e in watch_all(a.tasks, wrote) if e.HasField("tool_result")]
    assert len(written) == 1 and not written[0].HasField("error"), written
    assert not (workspace / "s.txt").exists()
    assert (tmp_path / "ws.tenant-team-a" / "s.txt").read_text() == "a's"


def test_a_revoked_token_ends_its_streams(stack: Stack, tmp_path: Path) -> None:
    """Taking a token out of the tenants file (no restart) refuses its next call
    and ends the watch it has open; the other tenant's watch goes on."""
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        f"  - name: team-a\n    tokens: ['{sha256(TOKEN_A)}']\n"
        f"  - name: team-b\n    tokens: ['{sha256(TOKEN_B)}']\n"
    )
    d = stack.dispatcher(
        "--admin-token",
        ADMIN,
        "--tenants-file",
        str(tenants),
        "--tenants-poll",
        "50ms",
        commander_token=SHARED_COMMANDER,
    )
    a, b = Client(d, TOKEN_A), Client(d, TOKEN_B)
    cfg = agent_pb2.CommonConfig()
    # No commander: both tasks stay pending, so both watches stay open.
    watch_a = a.tasks.WatchTask(tasks_pb2.WatchTaskRequest(task_id=a.submit("a", cfg)), timeout=30)
    task_b = b.submit("b", cfg)
    watch_b = b.tasks.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task_b), timeout=30)
    next(watch_a)
    next(watch_b)

    tenants.write_text(f"tenants:\n  - name: team-b\n    tokens: ['{sha256(TOKEN_B)}']\n")
    with pytest.raises(grpc.RpcError) as ended:
        for _ in watch_a:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED, ended.value
    assert code_of(a.listed) == grpc.StatusCode.UNAUTHENTICATED

    b.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task_b), timeout=10)
    statuses = [r.event.state.status for r in watch_b if r.event.HasField("state")]
    assert statuses[-1] == agent_pb2.CANCELLED, statuses
