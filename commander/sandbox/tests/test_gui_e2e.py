"""End to end: the gui planner drives a real X application through the real dispatcher.

Processes: the dispatcher binary, the local sandbox server (Xvfb + xdotool).
In this process: the commander (``gui`` planner + the ``computer.*`` sandbox
provider over the unmodified lybic SDK) and a scripted OpenAI-compatible model
replaying a UI-TARS trajectory. The X application is an xterm running
``cat > FILE``: what the agent types ends up in FILE.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import grpc.aio
import pytest
from lybic import LybicAPIError, LybicClient, Sandbox

from commander import Commander, ConnectionConfig
from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2
from commander._pricing import ModelPrice, PriceTable
from commander.gui._planner import GuiPlanner, GuiSettings
from commander.sandbox import SandboxTools, sandbox_provider
from commander.sandbox.tests.conftest import DispatcherProc, sandbox_settings
from commander.tests.fakes import Reply, ScriptedLLM, wait_for
from localsandbox.tests.harness import LocalServer, screenshot, settled_screenshot

pytestmark = pytest.mark.anyio

USAGE = {"prompt_tokens": 1500, "completion_tokens": 30, "total_tokens": 1530}
PRICES = PriceTable().extend({"ui-tars-scripted": ModelPrice(2.0, 8.0, "CNY")})


def uitars(thought: str, action: str, **kw: Any) -> Reply:
    return Reply.text(f"Thought: {thought}\nAction: {action}", usage=USAGE, **kw)


def gui_task(instruction: str, **fields: Any) -> tasks_pb2.SubmitTaskRequest:
    """A task for the gui planner: at most 10 steps and 2 minutes."""
    return tasks_pb2.SubmitTaskRequest(
        instruction=instruction,
        planner="gui",
        running_config=agent_pb2.CommonConfig(steps=10, taskTimeout=120),
        **fields,
    )


@pytest.fixture
async def lybic(sandbox_server: LocalServer) -> AsyncIterator[LybicClient]:
    async with sandbox_server.client() as client:
        yield client


async def _run(s: Sandbox, sid: str, *argv: str) -> tuple[int, str]:
    r = await s.execute_process(sid, executable=argv[0], args=list(argv[1:]))
    return r.exitCode, base64.b64decode(r.stdoutBase64).decode()


@pytest.fixture
async def xterm_sandbox(lybic: LybicClient, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A sandbox whose screen shows an xterm running ``cat > out.txt`` at the top left."""
    s = Sandbox(lybic)
    created = await s.create(name="gui-e2e", shape="local-1024x768", maxLifeSeconds=600)
    out = tmp_path / "out.txt"
    out.write_text("")
    try:
        empty = await screenshot(s, created.id)
        code, _ = await _run(
            s,
            created.id,
            "/bin/sh",
            "-c",
            f"xterm -geometry 80x24+0+0 -e sh -c 'cat > {out}' >/dev/null 2>&1 &",
        )
        assert code == 0
        with anyio.fail_after(20):
            while True:
                code, found = await _run(
                    s, created.id, "xdotool", "search", "--onlyvisible", "--class", "xterm"
                )
                if code == 0 and found.strip():
                    break
                await anyio.sleep(0.1)
        await settled_screenshot(s, created.id, unlike=empty)  # the xterm is drawn
        yield created.id, out
    finally:
        try:
            await s.delete(created.id)
        except LybicAPIError as exc:
            if exc.status_code != 404:  # the destroySandbox test deleted it already
                raise


@pytest.fixture
async def tasks(dispatcher_proc: DispatcherProc) -> AsyncIterator[tasks_pb2_grpc.TaskServiceStub]:
    """The dispatcher's TaskService, as a client calls it."""
    async with grpc.aio.insecure_channel(dispatcher_proc.addr) as channel:
        yield tasks_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture
async def commander(
    dispatcher_proc: DispatcherProc,
    sandbox_server: LocalServer,
    llm: ScriptedLLM,
    tasks: tasks_pb2_grpc.TaskServiceStub,
) -> AsyncIterator[tuple[Commander, SandboxTools]]:
    tools = SandboxTools(sandbox_settings(sandbox_server))
    settings = GuiSettings(
        base_url=llm.base_url,
        model="ui-tars-scripted",
        settle_seconds=0.2,
        prices=PRICES,
    )
    commander = Commander(
        ConnectionConfig(target=dispatcher_proc.addr, reconnect_initial=0.05, reconnect_max=0.3),
        slots=1,
        planners={"gui": GuiPlanner(settings, local_tools=tools)},
        tool_providers=[sandbox_provider(tools)],
        shutdown_grace=1.0,
    )
    async with commander:
        await commander.wait_connected()
        with anyio.fail_after(15):
            while True:
                listed = await tasks.ListTools(tasks_pb2.ListToolsRequest())
                if "computer.type" in {t.name for t in listed.tools}:
                    break
                await anyio.sleep(0.05)
        yield commander, tools
    await tools.aclose()


async def _finished(
    tasks: tasks_pb2_grpc.TaskServiceStub, task_id: str
) -> tuple[list[tasks_pb2.TaskEvent], tasks_pb2.Task]:
    """The task's events once it has ended, and the task then."""
    events = await _events(tasks, task_id)
    task = (await tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
    return events, task


async def _events(stub: tasks_pb2_grpc.TaskServiceStub, task_id: str) -> list[tasks_pb2.TaskEvent]:
    events = []
    with anyio.fail_after(60):
        call: Any = stub.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task_id))
        async for r in call:
            events.append(r.event)
    return events


def _kind(ev: tasks_pb2.TaskEvent) -> str:
    return ev.WhichOneof("kind") or ""


def _tool_calls(events: list[tasks_pb2.TaskEvent]) -> list[str]:
    return [ev.tool_call.tool_name for ev in events if _kind(ev) == "tool_call"]


async def _wait_file(path: Path, want: str, within: float = 10) -> str:
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: _read(path) == want, within)
    return _read(path)


def _read(path: Path) -> str:
    return path.read_text()


async def test_types_into_xterm_and_succeeds_with_true_statistics(
    commander: tuple[Commander, SandboxTools],
    tasks: tasks_pb2_grpc.TaskServiceStub,
    llm: ScriptedLLM,
    xterm_sandbox: tuple[str, Path],
) -> None:
    sid, out = xterm_sandbox
    llm.replies = [
        uitars("Focus the terminal.", "click(point='<point>150 120</point>')"),
        uitars("Type the line.", "type(content='hello from the gui agent\\n')"),
        uitars("The text is in the terminal.", "finished(content='typed the line')"),
    ]
    submitted = await tasks.SubmitTask(
        gui_task(
            "Type 'hello from the gui agent' into the terminal",
            sandbox=agent_pb2.Sandbox(id=sid),
        )
    )
    events, task = await _finished(tasks, submitted.task_id)

    assert task.status == agent_pb2.SUCCESS, (task.message, [_kind(e) for e in events])
    assert task.result == "typed the line"
    # The X application changed state: xterm got the keystrokes, cat wrote them.
    assert await _wait_file(out, "hello from the gui agent\n") == "hello from the gui agent\n"

    calls = _tool_calls(events)
    assert calls == [
        "computer.sandbox_acquire",
        "computer.screenshot",
        "computer.screenshot",
        "computer.click",
        "computer.screenshot",
        "computer.type",
        "computer.screenshot",
    ] or calls == [
        "computer.sandbox_acquire",
        "computer.screenshot",
        "computer.click",
        "computer.screenshot",
        "computer.type",
        "computer.screenshot",
    ], calls
    artifacts = [ev.artifact for ev in events if _kind(ev) == "artifact"]
    assert len(artifacts) == 3
    assert artifacts[0].kind == "screenshot" and artifacts[0].data[:4] == b"RIFF"
    assert any(_kind(ev) == "thought" for ev in events)

    # The model saw the screenshot as a data URL, in the UI-TARS conversation.
    first = llm.requests[0]["messages"]
    assert "## User Instruction" in first[0]["content"]
    image_part = first[-1]["content"][-1]
    assert image_part["image_url"]["url"].startswith("data:image/webp;base64,")

    stats = task.statistics
    assert stats.steps == 3
    assert stats.inputTokens == 3 * 1500
    assert stats.outputTokens == 3 * 30
    assert stats.totalTokens == 3 * 1530
    assert stats.cost == pytest.approx(3 * (1500 * 2.0 + 30 * 8.0) / 1e6)
    assert stats.currencySymbol in ("CNY", "¥")


async def test_stop_mid_step_executes_no_further_action_and_destroys_the_sandbox(
    commander: tuple[Commander, SandboxTools],
    tasks: tasks_pb2_grpc.TaskServiceStub,
    llm: ScriptedLLM,
    lybic: LybicClient,
    xterm_sandbox: tuple[str, Path],
) -> None:
    sid, out = xterm_sandbox
    slow = " ".join(["thinking"] * 200)
    llm.replies = [
        uitars("Focus the terminal.", "click(point='<point>150 120</point>')"),
        # Streams for ~10 s; the stop comes while it streams: its type() never runs.
        uitars(f"{slow}.", "type(content='AFTER THE STOP\\n')", delay=0.05),
        uitars("Never asked.", "type(content='NEVER\\n')"),
    ]
    submitted = await tasks.SubmitTask(
        gui_task(
            "Type something into the terminal",
            sandbox=agent_pb2.Sandbox(id=sid),
            destroy_sandbox=True,
        )
    )
    await wait_for(lambda: len(llm.streams) >= 2 and llm.streams[1].sent >= 5, 30)
    await tasks.CancelTask(
        tasks_pb2.CancelTaskRequest(task_id=submitted.task_id, reason="test stop")
    )
    events, task = await _finished(tasks, submitted.task_id)

    assert task.status == agent_pb2.CANCELLED, task.message
    calls = _tool_calls(events)
    assert "computer.click" in calls
    assert "computer.type" not in calls, calls
    # The model's HTTP stream was closed by the stop, long before its end.
    with anyio.fail_after(5):
        await llm.streams[1].client_closed.wait()
    assert not llm.streams[1].completed
    assert len(llm.streams) == 2
    # destroySandbox: destroyed although the task was cancelled.
    with anyio.fail_after(10):
        while True:
            try:
                await Sandbox(lybic).get(sid)
            except LybicAPIError as exc:
                assert exc.status_code == 404
                break
            await anyio.sleep(0.1)
    # Nothing was typed into the xterm in the whole rest of its life.
    assert _read(out) == ""
    # The tokens streamed before the stop are in the statistics.
    assert task.statistics.steps >= 1
    assert task.statistics.inputTokens >= 1500


async def test_previous_task_id_continues_the_sandbox(
    commander: tuple[Commander, SandboxTools],
    tasks: tasks_pb2_grpc.TaskServiceStub,
    llm: ScriptedLLM,
    xterm_sandbox: tuple[str, Path],
) -> None:
    """The second task names no sandbox; it continues the first one's (through the
    dispatcher: SandboxInUse → the task → StartSession.sandbox), so its keystrokes
    reach the same xterm."""
    sid, out = xterm_sandbox
    llm.replies = [
        uitars("Focus the terminal.", "click(point='<point>150 120</point>')"),
        uitars("Type the first line.", "type(content='one\\n')"),
        uitars("Done.", "finished(content='first')"),
        uitars("Type the second line.", "type(content='two\\n')"),
        uitars("Done.", "finished(content='second')"),
    ]
    first = await tasks.SubmitTask(gui_task("type one", sandbox=agent_pb2.Sandbox(id=sid)))
    await _events(tasks, first.task_id)
    second = await tasks.SubmitTask(gui_task("now type two", previous_task_id=first.task_id))
    events, task = await _finished(tasks, second.task_id)
    assert task.status == agent_pb2.SUCCESS, task.message
    assert task.sandbox.id == sid
    acquire = next(e.tool_call for e in events if _kind(e) == "tool_call")
    assert json.loads(acquire.arguments_json)["sandbox_id"] == sid
    assert await _wait_file(out, "one\ntwo\n") == "one\ntwo\n"
