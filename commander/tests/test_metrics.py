"""Prometheus metrics: the hooks move them (private registry), the CLI serves them."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from commander import Commander, SandboxSettings, SandboxTools, ToolError, _metrics
from commander.__main__ import build_parser, metrics_port, start_metrics
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander.sandbox._tools import tap_action
from commander.tests.fakes import DispatcherServer, Reply, ScriptedLLM, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A private registry with the commander's metrics installed on it."""
    registry = CollectorRegistry()
    previous = _metrics.install(_metrics.CommanderMetrics(registry))
    try:
        yield registry
    finally:
        _metrics.install(previous)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_chat_session_moves_the_metrics(
    registry: CollectorRegistry,
    dispatcher: DispatcherServer,
    llm: ScriptedLLM,
    make_commander: Callable[..., Commander],
) -> None:
    llm.replies += [
        Reply.tool_call("echo", {"text": "x"}),
        Reply(
            [{"content": "Hello"}, {"content": ", friend"}],
            usage={"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17},
        ),
    ]
    async with make_commander():
        slot = await dispatcher.servicer.next_slot()
        await wait_for(lambda: value(registry, "commander_slots_connected") == 1)
        session_id = await slot.start("hi", tools=[ipb.ToolSpec(name="echo", description="e")])
        call = (await slot.recv_kind("tool_call")).tool_call
        await slot.tool_result(session_id, call, '{"ok": true}')
        packets = await slot.recv_until_terminal()
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
        await wait_for(
            lambda: (
                value(registry, "commander_sessions_total", planner="chat", outcome="success") == 1
            )
        )
    await wait_for(lambda: value(registry, "commander_slots_connected") == 0)
    model = {"model": "test-model"}
    # the first turn's usage is estimated (the scripted tool call sends none), the second's is
    # the server's: 11 in, 6 out
    assert value(registry, "commander_model_tokens_total", **model, direction="input") > 11
    assert value(registry, "commander_model_tokens_total", **model, direction="output") >= 6
    assert value(registry, "commander_model_time_to_first_token_seconds_count", **model) == 2
    assert value(registry, "commander_step_duration_seconds_count", planner="chat") == 2
    assert value(registry, "commander_step_duration_seconds_sum", planner="chat") > 0
    assert value(registry, "commander_sessions_total", planner="chat", outcome="failure") == 0


async def test_a_failed_session_counts_as_failure(
    registry: CollectorRegistry,
    dispatcher: DispatcherServer,
    llm: ScriptedLLM,
    make_commander: Callable[..., Commander],
) -> None:
    llm.replies.append(Reply([], status=500))
    async with make_commander():
        slot = await dispatcher.servicer.next_slot()
        await slot.start("hi")
        await slot.recv_until_terminal()
        await wait_for(
            lambda: (
                value(registry, "commander_sessions_total", planner="chat", outcome="failure") == 1
            )
        )


async def test_sandbox_actions_are_timed_by_action_and_outcome(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FakeSandbox:
        fail = False

        async def execute_sandbox_action(self, sandbox_id: str, data: Any) -> Any:
            if self.fail:
                raise httpx.ConnectError("refused")
            return type("Answer", (), {"cursorPosition": None, "actionResult": None})()

    sandbox = FakeSandbox()
    tools = SandboxTools(SandboxSettings(org_id="o", api_key="k"))
    monkeypatch.setattr(tools, "_sandbox", lambda: sandbox)
    assert (await tools.act("sbx-1", tap_action(1, 2)))["ok"] is True
    sandbox.fail = True
    with pytest.raises(ToolError):
        await tools.act("sbx-1", tap_action(1, 2))
    name = "commander_sandbox_action_duration_seconds_count"
    assert value(registry, name, action="touch:tap", outcome="ok") == 1
    assert value(registry, name, action="touch:tap", outcome="error") == 1


def test_labelled_children_are_cached() -> None:
    metrics = _metrics.CommanderMetrics(CollectorRegistry())
    metrics.add_tokens("m", 1, 2)
    children = metrics._tokens["m"]
    metrics.add_tokens("m", 3, 0)
    assert metrics._tokens["m"] is children
    assert (
        metrics.registry.get_sample_value(
            "commander_model_tokens_total", {"model": "m", "direction": "input"}
        )
        == 4
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_are_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENABLE_PROMETHEUS", raising=False)
    args = build_parser().parse_args([])
    assert metrics_port(args) is None
    assert start_metrics(args, CollectorRegistry()) is None
    monkeypatch.setenv("ENABLE_PROMETHEUS", "true")
    monkeypatch.delenv("PROMETHEUS_PORT", raising=False)
    assert metrics_port(build_parser().parse_args([])) == 8000


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_cli_serves_metrics(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.delenv("ENABLE_PROMETHEUS", raising=False)
    monkeypatch.delenv("PROMETHEUS_HOST", raising=False)
    if how == "flag":
        argv = ["--metrics-port", str(port)]
    else:
        argv = []
        monkeypatch.setenv("ENABLE_PROMETHEUS", "true")
        monkeypatch.setenv("PROMETHEUS_PORT", str(port))
    args = build_parser().parse_args(argv)
    assert args.metrics_host == "127.0.0.1"
    registry = CollectorRegistry()
    previous = _metrics.current
    server = start_metrics(args, registry)
    try:
        assert server is not None
        assert _metrics.current is not None and _metrics.current.registry is registry
        _metrics.current.add_tokens("m", 5, 7)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.status == 200
            text = answer.read().decode()
        assert 'commander_model_tokens_total{direction="output",model="m"} 7.0' in text
        assert "commander_slots_connected 0.0" in text
        assert "commander_sessions_total" in text
    finally:
        _metrics.install(previous)
        if server is not None:
            server.shutdown()
            server.server_close()
