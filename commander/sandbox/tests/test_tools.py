"""The computer.* tools over the real lybic SDK: against the local sandbox, and
against a counting stub for the no-retry guarantee."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from lybic import LybicClient, Sandbox

from commander._errors import InvalidToolArgumentsError, ToolExecutionError
from commander._provider import CallContext
from commander.gui import KeyboardType
from commander.sandbox import TOOL_NAMES, SandboxSettings, SandboxTools, sandbox_provider
from commander.sandbox.tests.conftest import sandbox_settings
from localsandbox.tests.harness import LocalServer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def tools(sandbox_server: LocalServer) -> AsyncIterator[SandboxTools]:
    t = SandboxTools(sandbox_settings(sandbox_server))
    try:
        yield t
    finally:
        await t.aclose()


async def test_life_screenshot_and_actions(tools: SandboxTools) -> None:
    provider = sandbox_provider(tools)
    assert [spec.name for spec in provider.specs] == list(TOOL_NAMES)
    assert all(
        spec.side_effects
        for spec in provider.specs
        if spec.name not in ("computer.screenshot", "computer.describe_screen", "computer.wait")
    )
    got = await provider.call("computer.sandbox_acquire", {"shape": "local-1024x768"})
    sid = got["sandbox_id"]
    try:
        assert got["created"] is True and (got["width"], got["height"]) == (1024, 768)
        shot = await provider.call("computer.screenshot", {"sandbox_id": sid})
        assert base64.b64decode(shot["image_base64"])[:4] == b"RIFF"
        assert shot["mime_type"] == "image/webp"
        moved = await provider.call("computer.move", {"sandbox_id": sid, "x": 300, "y": 200})
        assert moved["cursor"] == {"x": 300, "y": 200}
        steps: list[tuple[str, dict[str, Any]]] = [
            ("computer.click", {"x": 10, "y": 10}),
            ("computer.double_click", {"x": 10, "y": 10}),
            ("computer.triple_click", {"x": 10, "y": 10, "button": "left"}),
            ("computer.right_click", {"x": 10, "y": 10}),
            ("computer.middle_click", {"x": 10, "y": 10}),
            ("computer.drag", {"start_x": 10, "start_y": 10, "end_x": 50, "end_y": 60}),
            ("computer.scroll", {"x": 10, "y": 10, "down": 2}),
            ("computer.type", {"text": "abc"}),
            ("computer.hotkey", {"keys": "ctrl+a"}),
            ("computer.key_down", {"key": "shift"}),
            ("computer.key_up", {"key": "shift"}),
        ]
        for name, args in steps:
            answer = await provider.call(name, {"sandbox_id": sid, **args})
            assert answer["ok"] is True, (name, answer)
        assert await provider.call("computer.wait", {"duration_ms": 10}) == {
            "ok": True,
            "waited_ms": 10,
        }
        with pytest.raises(InvalidToolArgumentsError):
            await provider.call("computer.click", {"sandbox_id": sid, "x": -1, "y": 0})
        with pytest.raises(InvalidToolArgumentsError):
            await provider.call(
                "computer.click", {"sandbox_id": sid, "x": 1, "y": 1, "button": "x"}
            )
        reused = await provider.call("computer.sandbox_acquire", {"sandbox_id": sid})
        assert reused["sandbox_id"] == sid and reused["created"] is False
    finally:
        released = await provider.call("computer.sandbox_release", {"sandbox_id": sid})
    assert released == {"sandbox_id": sid, "deleted": True}
    with pytest.raises(InvalidToolArgumentsError):  # 404
        await tools.screenshot(sid)


async def test_precreated_sandbox_is_used_and_kept(
    sandbox_server: LocalServer, tools: SandboxTools
) -> None:
    async with sandbox_server.client() as client:
        made = await Sandbox(client).create(name="pre", shape="local-1024x768")
        try:
            pre = SandboxTools(
                SandboxSettings(
                    endpoint=tools.settings.endpoint,
                    org_id=tools.settings.org_id,
                    api_key=tools.settings.api_key,
                    precreate_sid=made.id,
                )
            )
            got = await pre.acquire()
            assert got["sandbox_id"] == made.id and got["created"] is False
            kept = await pre.release(made.id)
            assert kept["deleted"] is False
            assert (await Sandbox(client).get(made.id)).sandbox.id == made.id
            await pre.aclose()
        finally:
            await Sandbox(client).delete(made.id)


def _counting(status: int) -> tuple[list[str], httpx.AsyncClient]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return httpx.Response(status, json={"message": "boom", "code": "x"})

    return seen, httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _stubbed(status: int) -> tuple[list[str], SandboxTools]:
    tools = SandboxTools(SandboxSettings(endpoint="http://stub", org_id="o", api_key="k"))
    client: LybicClient = tools._lybic()
    assert client.max_retries == 0
    seen, http = _counting(status)
    client.client = http
    return seen, tools


async def test_actions_are_never_retried() -> None:
    seen, tools = _stubbed(503)
    with pytest.raises(ToolExecutionError) as info:
        await tools.act("SBX-1", KeyboardType("x"))
    assert len(seen) == 1, seen  # one POST, whatever the answer
    assert "503" in info.value.message or "unavailable" in info.value.message
    await tools.aclose()


async def test_reads_are_retried_on_5xx_only() -> None:
    seen, tools = _stubbed(503)
    with pytest.raises(ToolExecutionError):
        await tools.screenshot("SBX-1")
    assert len(seen) == 3
    seen4, tools4 = _stubbed(404)
    with pytest.raises(InvalidToolArgumentsError):
        await tools4.screenshot("SBX-1")
    assert len(seen4) == 1
    await tools.aclose()
    await tools4.aclose()


async def test_no_credentials_is_a_clear_error() -> None:
    tools = SandboxTools(SandboxSettings(endpoint="http://stub"))
    with pytest.raises(ToolExecutionError, match="no Lybic credentials"):
        await tools.screenshot("SBX-1")


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LYBIC_API_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("LYBIC_ORG_ID", "org")
    monkeypatch.setenv("LYBIC_API_KEY", "key")
    monkeypatch.setenv("LYBIC_PRECREATE_SID", "SBX-pre")
    settings = SandboxSettings.from_env(default_shape="local-1280x720")
    assert (settings.endpoint, settings.org_id, settings.precreate_sid) == (
        "http://127.0.0.1:9",
        "org",
        "SBX-pre",
    )
    assert settings.default_shape == "local-1280x720" and settings.configured
    assert "key" not in repr(settings)
    assert not SandboxSettings().configured
    assert json.dumps(TOOL_NAMES)


async def test_android_tools_send_the_sdk_actions() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"actionResult": {"apps": ["a"]}})

    tools = SandboxTools(SandboxSettings(endpoint="http://stub", org_id="o", api_key="k"))
    tools._lybic().client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    provider = sandbox_provider(tools)
    sid = {"sandbox_id": "SBX-1"}
    # The task was given SBX-1 (the dispatcher says so in the invocation).
    given = CallContext(task_id="T1", sandbox_ids=frozenset({"SBX-1"}))

    async def call(name: str, args: dict[str, Any]) -> Any:
        return await provider.call(name, args, context=given)

    await call("mobile.tap", {**sid, "x": 5, "y": 6})
    await call("mobile.long_press", {**sid, "x": 5, "y": 6, "duration_ms": 700})
    await call("mobile.swipe", {**sid, "x": 5, "y": 6, "direction": "up", "distance": 90})
    await call("mobile.drag", {**sid, "start_x": 1, "start_y": 2, "end_x": 3, "end_y": 4})
    await call("mobile.back", sid)
    await call("mobile.home", sid)
    await call("mobile.start_app", {**sid, "package_name": "com.x"})
    await call("mobile.close_app", {**sid, "name": "Clock"})
    listed = await call("mobile.list_apps", sid)
    assert listed["result"] == {"apps": ["a"]}
    actions = [b["action"] for b in bodies]
    assert [a["type"] for a in actions] == [
        "touch:tap",
        "touch:longPress",
        "touch:swipe",
        "touch:drag",
        "android:back",
        "android:home",
        "os:startApp",
        "os:closeAppByName",
        "os:listApps",
    ]
    assert actions[0]["x"] == {"type": "px", "value": 5}
    assert actions[1]["duration"] == 700 and actions[2]["direction"] == "up"
    assert actions[6]["packageName"] == "com.x" and actions[7]["name"] == "Clock"
    assert all(b["includeScreenShot"] is False for b in bodies)
    with pytest.raises(InvalidToolArgumentsError):
        await call("mobile.swipe", {**sid, "x": 1, "y": 1, "direction": "in", "distance": 1})
    await tools.aclose()


async def test_describe_screen_lists_a_real_xterm(tools: SandboxTools) -> None:
    provider = sandbox_provider(tools)
    got = await provider.call("computer.sandbox_acquire", {"shape": "local-1024x768"})
    sid = got["sandbox_id"]
    try:
        empty = await provider.call("computer.describe_screen", {"sandbox_id": sid})
        assert (empty["width"], empty["height"]) == (1024, 768)
        assert empty["windows"] == []
        assert "Screen: 1024x768 pixels." in empty["text"]
        sandbox = Sandbox(tools._lybic())
        await sandbox.execute_process(
            sid,
            executable="/bin/sh",
            args=["-c", "xterm -T demo-term -geometry 40x10+30+40 >/dev/null 2>&1 &"],
        )
        import anyio

        described: dict[str, Any] = {}
        for _ in range(100):
            described = await provider.call("computer.describe_screen", {"sandbox_id": sid})
            if described["windows"]:
                break
            await anyio.sleep(0.1)
        titles = [w["title"] for w in described["windows"]]
        assert "demo-term" in titles, described
        win = described["windows"][titles.index("demo-term")]
        assert (win["x"], win["y"]) == (30, 40) and win["width"] > 50 and win["height"] > 50
        assert '"demo-term" at x=30 y=40' in described["text"]
    finally:
        await provider.call("computer.sandbox_release", {"sandbox_id": sid})


def test_parse_screen_description_keeps_real_windows_and_marks_focus() -> None:
    from commander.sandbox._tools import parse_screen_description

    out = "\n".join(
        [
            "SCREEN=800 600",
            "FOCUS=7",
            "POINTER_X=5",
            "POINTER_Y=6",
            "WINDOW=7",
            "X=1",
            "Y=2",
            "WIDTH=300",
            "HEIGHT=200",
            "NAME=term; rm -rf / $(x)",
            "WINDOW=8",
            "X=0",
            "Y=0",
            "WIDTH=1",
            "HEIGHT=1",
            "NAME=tiny",
            "garbage line",
        ]
    )
    d = parse_screen_description(out)
    assert (d["width"], d["height"], d["pointer"]) == (800, 600, {"x": 5, "y": 6})
    assert d["windows"] == [
        {
            "id": 7,
            "title": "term; rm -rf / $(x)",
            "x": 1,
            "y": 2,
            "width": 300,
            "height": 200,
            "focused": True,
        }
    ]
    assert d["text"].splitlines() == [
        "Screen: 800x600 pixels.",
        "Visible windows:",
        '- "term; rm -rf / $(x)" at x=1 y=2, 300x200 pixels, has the keyboard focus',
        "Pointer at x=5 y=6.",
    ]
