"""The computer.* tools act only within their task.

Two ways a task could reach outside itself, both closed here:

* key names: xdotool chains commands, so ``hotkey(keys="a exec touch f")`` or a
  ``hold_key`` of ``"a+exec+touch+f"`` ran a program on the sandbox host. The
  tools check every key name against the GUI parser's key table before any
  request (and the local sandbox server checks again, see localsandbox/tests).
* sandbox ids: one Lybic org holds every task's sandboxes; a task may act only
  on the ones it created, was given, or the provider's precreated one.

Against the real local sandbox server (Xvfb + xdotool) and, at the end, the real
dispatcher binary, which tells the provider whose call it is.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc.aio
import httpx
import pytest
from lybic import LybicAPIError, Sandbox, dto

from commander import ChatPlanner, Commander, ConnectionConfig
from commander._chat import LLMSettings
from commander._errors import InvalidToolArgumentsError, ToolDeniedError
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2
from commander._provider import CallContext, ToolProvider
from commander.gui import KeyboardHotkey
from commander.gui._keys import _NAMED, xdotool_keys
from commander.sandbox import SandboxSettings, SandboxTools, sandbox_provider
from commander.sandbox._owners import SandboxOwners
from commander.sandbox.tests.conftest import DispatcherProc, sandbox_settings
from commander.tests.fakes import Reply, ScriptedLLM
from localsandbox import _keys as server_keys
from localsandbox.tests.harness import ROOT, LocalServer

pytestmark = pytest.mark.anyio

TASK_A = CallContext(task_id="task-A")
TASK_B = CallContext(task_id="task-B")


@pytest.fixture
async def tools(sandbox_server: LocalServer) -> AsyncIterator[SandboxTools]:
    t = SandboxTools(sandbox_settings(sandbox_server))
    try:
        yield t
    finally:
        await t.aclose()


@contextlib.asynccontextmanager
async def acquired(provider: ToolProvider, call: CallContext) -> AsyncIterator[str]:
    got = await provider.call("computer.sandbox_acquire", {"shape": "local-1024x768"}, context=call)
    sid = str(got["sandbox_id"])
    try:
        yield sid
    finally:
        with contextlib.suppress(ToolDeniedError, InvalidToolArgumentsError):
            await provider.call("computer.sandbox_release", {"sandbox_id": sid}, context=call)


@pytest.fixture
def marker() -> Iterator[tuple[str, list[Path]]]:
    """A file name an injected ``touch`` would create: in the sandbox server's
    working directory (a relative path) and in /tmp (an absolute one)."""
    name = f"pwned_{secrets.token_hex(4)}"
    paths = [ROOT / name, Path("/tmp") / name]
    try:
        yield name, paths
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def _injections(name: str) -> list[tuple[str, dict[str, Any]]]:
    xy = {"x": 5, "y": 5}
    return [
        ("computer.hotkey", {"keys": f"a exec touch /tmp/{name}"}),
        ("computer.hotkey", {"keys": f"a exec touch {name}"}),
        ("computer.hotkey", {"keys": f"a EXEC touch {name}", "duration_ms": 10}),
        ("computer.key_down", {"key": f"a+exec+touch+{name}"}),
        ("computer.key_up", {"key": f"a+exec+touch+{name}"}),
        ("computer.click", {**xy, "hold_key": f"a+exec+touch+{name}"}),
        ("computer.right_click", {**xy, "hold_key": f"shift+exec+touch+{name}"}),
        ("computer.double_click", {**xy, "hold_key": f"a+exec+touch+{name}"}),
    ]


# ---------------------------------------------------------------- key names


async def test_injected_key_names_are_refused_and_nothing_runs(
    tools: SandboxTools, marker: tuple[str, list[Path]]
) -> None:
    """Through the tools (not the GUI parser), on the real server: refused with
    INVALID_ARGUMENTS naming the bad key, and no program ran on the sandbox host."""
    name, paths = marker
    provider = sandbox_provider(tools)
    async with acquired(provider, TASK_A) as sid:
        for tool, args in _injections(name):
            with pytest.raises(InvalidToolArgumentsError) as info:
                await provider.call(tool, {"sandbox_id": sid, **args}, context=TASK_A)
            assert "unknown key name 'exec'" in info.value.message.lower(), (tool, info.value)
        # Any caller of SandboxTools, with an action built by hand or an SDK DTO.
        for action in (
            KeyboardHotkey(f"a exec touch {name}"),
            dto.KeyboardHotkeyAction(keys=f"a exec touch {name}"),
            dto.KeyDownAction(key=f"a+exec+touch+{name}"),
            dto.MouseMoveAction(
                x=dto.PixelLength(value=1),
                y=dto.PixelLength(value=1),
                holdKey=f"a+exec+touch+{name}",
            ),
        ):
            with pytest.raises(InvalidToolArgumentsError, match="unknown key name 'exec'"):
                await tools.act(sid, action)
        # Real keys still work.
        ok = await provider.call(
            "computer.hotkey", {"sandbox_id": sid, "keys": "ctrl+a BackSpace"}, context=TASK_A
        )
        assert ok["ok"] is True
    assert [p for p in paths if p.exists()] == []


def _stub_tools() -> tuple[list[dict[str, Any]], SandboxTools]:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={})

    tools = SandboxTools(SandboxSettings(endpoint="http://stub", org_id="o", api_key="k"))
    tools._lybic().client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return bodies, tools


async def test_keys_are_checked_before_any_request_and_normalised() -> None:
    """The tool layer refuses on its own (whatever the sandbox API would do) and
    sends keys in the key table's keysyms."""
    bodies, tools = _stub_tools()
    provider = sandbox_provider(tools)
    given = CallContext(task_id="T", sandbox_ids=frozenset({"SBX-1"}))
    try:
        for tool, args in [
            *_injections("x"),
            ("computer.hotkey", {"keys": "--clearmodifiers"}),
            ("computer.hotkey", {"keys": "ctrl+$(reboot)"}),
            ("computer.key_down", {"key": "ctrl c"}),  # one combination, not a sequence
            ("computer.hotkey", {"keys": " ".join(["a"] * 17)}),
        ]:
            with pytest.raises(InvalidToolArgumentsError):
                await provider.call(tool, {"sandbox_id": "SBX-1", **args}, context=given)
        assert bodies == []
        await provider.call(
            "computer.hotkey", {"sandbox_id": "SBX-1", "keys": "ctrl+c enter"}, context=given
        )
        await provider.call(
            "computer.click",
            {"sandbox_id": "SBX-1", "x": 1, "y": 1, "hold_key": "Control_L"},
            context=given,
        )
        await provider.call(
            "computer.key_down", {"sandbox_id": "SBX-1", "key": "shift"}, context=given
        )
        keys = [b["action"].get("keys") or b["action"].get("holdKey") for b in bodies[:2]]
        assert keys == ["ctrl+c Return", "Control_L"]
        assert bodies[2]["action"]["key"] == "shift"
    finally:
        await tools.aclose()


def test_every_key_the_tools_send_is_one_the_local_server_presses() -> None:
    """One key table on the commander side; every keysym in it is a key on the
    server side too, and none is an xdotool command."""
    for sym in set(_NAMED.values()):
        assert xdotool_keys(sym) == sym  # a fixed point: checking twice is harmless
        server_keys.check_part(sym, "key")
        assert server_keys.argument([sym]).lower() not in server_keys.XDOTOOL_COMMANDS


# ---------------------------------------------------------------- sandbox ids


async def test_a_task_cannot_touch_another_tasks_sandbox(
    tools: SandboxTools, sandbox_server: LocalServer
) -> None:
    provider = sandbox_provider(tools)
    async with acquired(provider, TASK_A) as sid_a, acquired(provider, TASK_B) as sid_b:
        assert sid_a != sid_b
        foreign: list[tuple[str, dict[str, Any]]] = [
            ("computer.screenshot", {}),
            ("computer.describe_screen", {}),
            ("computer.click", {"x": 1, "y": 1}),
            ("computer.type", {"text": "rm -rf ~\n"}),
            ("computer.hotkey", {"keys": "ctrl+c"}),
            ("computer.key_down", {"key": "shift"}),
            ("mobile.tap", {"x": 1, "y": 1}),
            ("computer.sandbox_acquire", {}),
            ("computer.sandbox_release", {}),
        ]
        for tool, args in foreign:
            with pytest.raises(ToolDeniedError) as info:
                await provider.call(tool, {"sandbox_id": sid_a, **args}, context=TASK_B)
            assert f"sandbox '{sid_a}' is not this task's" in info.value.message, tool
            assert "task task-B" in info.value.message
        # A made-up id, and a call that names no task, are refused the same way.
        with pytest.raises(ToolDeniedError):
            await provider.call("computer.screenshot", {"sandbox_id": "SBX-guess"}, context=TASK_B)
        with pytest.raises(ToolDeniedError):
            await provider.call("computer.screenshot", {"sandbox_id": sid_a})
        # The release was refused: task A's sandbox is alive and still A's.
        async with sandbox_server.client() as client:
            assert (await Sandbox(client).get(sid_a)).sandbox.id == sid_a
        shot = await provider.call("computer.screenshot", {"sandbox_id": sid_a}, context=TASK_A)
        assert shot["width"] == 1024
        # Each task acts on its own.
        moved = await provider.call(
            "computer.move", {"sandbox_id": sid_b, "x": 3, "y": 4}, context=TASK_B
        )
        assert moved["cursor"] == {"x": 3, "y": 4}
        # Given by the dispatcher (the client's sandbox, or the previous task's):
        # task B may use A's sandbox then.
        continued = CallContext(task_id="task-B", sandbox_ids=frozenset({sid_a}))
        got = await provider.call(
            "computer.sandbox_acquire", {"sandbox_id": sid_a}, context=continued
        )
        assert got["sandbox_id"] == sid_a and got["created"] is False
        await provider.call(
            "computer.move", {"sandbox_id": sid_a, "x": 1, "y": 1}, context=continued
        )
        # Once released, not even its creator may use the id again.
        released = await provider.call(
            "computer.sandbox_release", {"sandbox_id": sid_b}, context=TASK_B
        )
        assert released["deleted"] is True
        with pytest.raises(ToolDeniedError):
            await provider.call("computer.screenshot", {"sandbox_id": sid_b}, context=TASK_B)


async def test_the_precreated_sandbox_is_every_tasks(sandbox_server: LocalServer) -> None:
    async with sandbox_server.client() as client:
        made = await Sandbox(client).create(name="pre", shape="local-1024x768")
        settings = sandbox_settings(sandbox_server)
        tools = SandboxTools(
            SandboxSettings(
                endpoint=settings.endpoint,
                org_id=settings.org_id,
                api_key=settings.api_key,
                precreate_sid=made.id,
            )
        )
        provider = sandbox_provider(tools)
        try:
            for call in (TASK_A, TASK_B):
                got = await provider.call("computer.sandbox_acquire", {}, context=call)
                assert got["sandbox_id"] == made.id and got["created"] is False
                await provider.call("computer.screenshot", {"sandbox_id": made.id}, context=call)
            kept = await provider.call(
                "computer.sandbox_release", {"sandbox_id": made.id}, context=TASK_B
            )
            assert kept["deleted"] is False
        finally:
            await tools.aclose()
            await Sandbox(client).delete(made.id)


async def test_the_precreated_sandbox_is_the_default_tenants_only(
    sandbox_server: LocalServer,
) -> None:
    """With tenants, one precreated desktop for every task would be shared by all
    tenants: a named tenant's task creates its own and may not touch it."""
    async with sandbox_server.client() as client:
        made = await Sandbox(client).create(name="pre", shape="local-1024x768")
        settings = sandbox_settings(sandbox_server)
        tools = SandboxTools(
            SandboxSettings(
                endpoint=settings.endpoint,
                org_id=settings.org_id,
                api_key=settings.api_key,
                precreate_sid=made.id,
            )
        )
        provider = sandbox_provider(tools)
        team_a = CallContext(task_id="T-team-a", tenant="team-a")
        own = ""
        try:
            got = await provider.call("computer.sandbox_acquire", {}, context=team_a)
            own = got["sandbox_id"]
            assert own != made.id and got["created"] is True
            with pytest.raises(ToolDeniedError):
                await provider.call("computer.screenshot", {"sandbox_id": made.id}, context=team_a)
            with pytest.raises(ToolDeniedError):
                await provider.call(
                    "computer.sandbox_acquire", {"sandbox_id": made.id}, context=team_a
                )
            # The default tenant's tasks (no tenants file) still use it.
            got = await provider.call("computer.sandbox_acquire", {}, context=TASK_A)
            assert got["sandbox_id"] == made.id
        finally:
            await tools.aclose()
            await Sandbox(client).delete(made.id)
            if own and own != made.id:
                await Sandbox(client).delete(own)


def test_owners_forget_the_oldest_tasks_first() -> None:
    owners = SandboxOwners(max_tasks=2)
    calls = [CallContext(task_id=f"t{i}") for i in range(3)]
    for i, call in enumerate(calls):
        owners.created(call, f"SBX-{i}")
    assert not owners.may_use(calls[0], "SBX-0")
    assert owners.may_use(calls[1], "SBX-1") and owners.may_use(calls[2], "SBX-2")
    # Forgotten by the provider, still given by the dispatcher once reported.
    reported = CallContext(task_id="t0", sandbox_ids=frozenset({"SBX-0"}))
    assert owners.may_use(reported, "SBX-0")
    owners.released("SBX-1")
    assert not owners.may_use(calls[1], "SBX-1")
    assert not owners.may_use(CallContext(), "")


# ---------------------------------------------------------------- through the dispatcher


async def _run_task(
    stub: tasks_pb2_grpc.TaskServiceStub, request: tasks_pb2.SubmitTaskRequest
) -> list[tasks_pb2.TaskEvent]:
    submitted = await stub.SubmitTask(request)
    events = []
    with anyio.fail_after(60):
        call: Any = stub.WatchTask(tasks_pb2.WatchTaskRequest(task_id=submitted.task_id))
        async for r in call:
            events.append(r.event)
    return events


def _results(events: list[tasks_pb2.TaskEvent]) -> list[ipb.ToolCallResult]:
    return [e.tool_result.result for e in events if e.WhichOneof("kind") == "tool_result"]


async def test_through_the_dispatcher_a_task_reaches_only_its_own_sandbox(
    dispatcher_proc: DispatcherProc, sandbox_server: LocalServer, llm: ScriptedLLM
) -> None:
    """The dispatcher names the task and its sandbox in every invocation: task A,
    given sandbox S by its client, screenshots it; task B, given none, is denied
    S for a screenshot and for a release, and S lives on."""
    async with sandbox_server.client() as client:
        made = await Sandbox(client).create(name="task-a", shape="local-1024x768")
    sid = made.id
    tools = SandboxTools(sandbox_settings(sandbox_server))
    commander = Commander(
        ConnectionConfig(target=dispatcher_proc.addr, reconnect_initial=0.05, reconnect_max=0.3),
        slots=1,
        planners={"chat": ChatPlanner(LLMSettings(base_url=llm.base_url, model="m"))},
        tool_providers=[sandbox_provider(tools, provider_id="sandbox-isolation")],
        shutdown_grace=1.0,
    )
    shot = Reply.tool_call("computer__screenshot", {"sandbox_id": sid}, call_id="shot")
    release = Reply.tool_call("computer__sandbox_release", {"sandbox_id": sid}, call_id="rel")
    llm.replies = [shot, Reply.text("seen"), shot, release, Reply.text("tried")]
    try:
        async with commander:
            await commander.wait_connected()
            async with grpc.aio.insecure_channel(dispatcher_proc.addr) as channel:
                stub = tasks_pb2_grpc.TaskServiceStub(channel)
                with anyio.fail_after(15):
                    while True:
                        listed = await stub.ListTools(tasks_pb2.ListToolsRequest())
                        if "computer.sandbox_release" in {t.name for t in listed.tools}:
                            break
                        await anyio.sleep(0.05)
                config = agent_pb2.CommonConfig(steps=5, taskTimeout=60)
                a = await _run_task(
                    stub,
                    tasks_pb2.SubmitTaskRequest(
                        instruction="look at the screen",
                        planner="chat",
                        sandbox=agent_pb2.Sandbox(id=sid),
                        running_config=config,
                    ),
                )
                b = await _run_task(
                    stub,
                    tasks_pb2.SubmitTaskRequest(
                        instruction="look at someone else's screen",
                        planner="chat",
                        running_config=config,
                    ),
                )
        [a_shot] = _results(a)
        assert not a_shot.HasField("error"), a_shot.error
        assert json.loads(a_shot.result_json)["width"] == 1024
        b_shot, b_release = _results(b)
        for r in (b_shot, b_release):
            assert r.error.code == ipb.TOOL_ERROR_CODE_DENIED, r
            assert f"sandbox '{sid}' is not this task's" in r.error.message
        async with sandbox_server.client() as client:
            assert (await Sandbox(client).get(sid)).sandbox.id == sid
    finally:
        await tools.aclose()
        async with sandbox_server.client() as client:
            with contextlib.suppress(LybicAPIError):
                await Sandbox(client).delete(sid)
