"""Brokered tool calls through the real commander: a built-in tool and a tool of a
separate provider process come back by call_id; every error case yields an
error tool_result and the session goes on to finish."""

from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace

import pytest

from commander._gen.dispatch.v1 import interaction_pb2, tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, start_watch, wait_status, watch_all
from tests._procs import wait_until
from tests.conftest import Stack
from tests.scripted import tool_call

pytestmark = pytest.mark.e2e

FILE_TEXT = "hello from the scripted model"
DONE = "Wrote the file; 6 * 7 = 42."
RECOVERED = "Recovered after the tool errors and finished."

HAPPY = [
    {
        "tool_calls": [
            tool_call("calculator", {"expression": "6 * 7"}),
            tool_call("workspace.write_file", {"path": "notes/out.txt", "content": FILE_TEXT}),
        ]
    },
    {"content": DONE},
]

ERRORS = [
    {
        "tool_calls": [
            tool_call("no_such_tool", {"x": 1}),
            # Valid JSON, but not an object (scriptedllm refuses to serve
            # arguments that are not JSON at all; see test_bad_input for those).
            tool_call("calculator", "[1, 2]"),
            tool_call("calculator", {"expr": "1 + 1"}),  # fails the schema
            tool_call("test.hang_timeout", {}),  # provider never answers: TIMEOUT
            tool_call("test.hang", {}),  # provider killed mid-call
        ]
    },
    {"content": RECOVERED},
]

E = interaction_pb2


@pytest.fixture(scope="module")
def env(module_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    happy = module_stack.scripted(HAPPY)
    errors = module_stack.scripted(ERRORS)
    sleepy = module_stack.scripted([{"tool_calls": [tool_call("sleep", {"ms": 30000})]}])
    hangy = module_stack.scripted([{"tool_calls": [tool_call("test.hang", {"n": 1})]}])
    d = module_stack.dispatcher()
    workspace = tmp_path_factory.mktemp("workspace")
    provider = module_stack.provider(d, workspace)
    module_stack.commander(d, happy.base_url, slots=2, wait_slots=2)
    return SimpleNamespace(
        d=d,
        happy=happy,
        errors=errors,
        sleepy=sleepy,
        hangy=hangy,
        workspace=workspace,
        provider=provider,
    )


def pairs(
    events: list[tasks_pb2.TaskEvent],
) -> list[tuple[E.ToolCallRequest, tasks_pb2.ToolResultEvent]]:
    """Tool calls with their results, matched by call_id (each exactly once)."""
    calls = [e.tool_call for e in events if kind(e) == "tool_call"]
    results = [e.tool_result for e in events if kind(e) == "tool_result"]
    by_id = {}
    for r in results:
        assert r.result.call_id, f"tool_result without call_id: {r}"
        assert r.result.call_id not in by_id, f"two results for {r.result.call_id}"
        by_id[r.result.call_id] = r
    assert len({c.call_id for c in calls}) == len(calls), "duplicate call_id in tool calls"
    assert set(by_id) == {c.call_id for c in calls}, describe(events)
    # A result comes after its call.
    seq_of = {e.tool_call.call_id: e.seq for e in events if kind(e) == "tool_call"}
    for e in events:
        if kind(e) == "tool_result":
            assert e.seq > seq_of[e.tool_result.result.call_id]
    return [(c, by_id[c.call_id]) for c in calls]


def test_builtin_and_provider_tools_by_call_id(env: SimpleNamespace) -> None:
    d = env.d
    task_id = d.submit(f"compute and write [{uuid.uuid4().hex[:8]}]", env.happy)
    events = watch_all(d.tasks, task_id, timeout=30)
    matched = pairs(events)
    assert [c.tool_name for c, _ in matched] == ["calculator", "workspace.write_file"], describe(
        events
    )
    (_, calc_res), (write, write_res) = matched
    assert not calc_res.result.HasField("error"), calc_res
    assert calc_res.result.tool_name == "calculator"
    assert calc_res.executor == "builtin", calc_res
    assert "42" in calc_res.result.result_json, calc_res

    assert not write_res.result.HasField("error"), write_res
    assert write_res.result.tool_name == "workspace.write_file"
    assert write_res.executor not in ("", "builtin"), write_res
    assert json.loads(write.arguments_json) == {"path": "notes/out.txt", "content": FILE_TEXT}
    written = env.workspace / "notes" / "out.txt"
    assert written.read_text() == FILE_TEXT

    content = "".join(e.content.text for e in events if kind(e) == "content")
    assert content == DONE
    assert kind(events[-1]) == "state" and events[-1].state.status == agent_pb2.SUCCESS
    status = wait_status(d.agent, task_id)
    assert status.status == agent_pb2.SUCCESS and status.result == DONE
    assert status.executionStatistics.steps >= 2, status.executionStatistics

    # The seed-000 projection shows the calls and results too.
    stream = [
        r.taskStream
        for r in d.agent.GetAgentTaskStream(
            agent_pb2.GetAgentTaskStreamRequest(taskId=task_id), timeout=10
        )
    ]
    stages = [s.stage for s in stream]
    assert stages.count("tool_call") == 2 and stages.count("tool_result") == 2, stages
    assert any(s.stage == "tool_call" and s.message.startswith("calculator(") for s in stream)
    assert any(s.stage == "tool_result" and "42" in s.message for s in stream)


def test_tool_errors_yield_error_results_and_the_session_goes_on(
    env: SimpleNamespace, stack: Stack
) -> None:
    d = env.d
    hang = stack.hanging_provider(d)
    task_id = d.submit(f"misuse the tools [{uuid.uuid4().hex[:8]}]", env.errors)

    # Kill the provider (kill -9) while its `test.hang` call is in flight.
    wait_until(
        lambda: "INVOKED test.hang " in hang.log_text(),
        30,
        "test.hang invoked on the provider",
        procs=[hang, d.proc],
    )
    hang.kill9()

    events = watch_all(d.tasks, task_id, timeout=30)
    matched = pairs(events)
    got = [
        (
            c.tool_name,
            E.ToolErrorCode.Name(r.result.error.code) if r.result.HasField("error") else "OK",
        )
        for c, r in matched
    ]
    assert got == [
        ("no_such_tool", "TOOL_ERROR_CODE_UNKNOWN_TOOL"),
        ("calculator", "TOOL_ERROR_CODE_INVALID_ARGUMENTS"),
        ("calculator", "TOOL_ERROR_CODE_INVALID_ARGUMENTS"),
        ("test.hang_timeout", "TOOL_ERROR_CODE_TIMEOUT"),
        ("test.hang", "TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE"),
    ], describe(events)
    for _, r in matched:
        assert r.result.error.message, r
        assert not r.result.result_json, r

    # The timed-out invocation was cancelled on the provider.
    log = hang.log_text()
    timed_out = next(
        x.split()[2] for x in log.splitlines() if x.startswith("INVOKED test.hang_timeout ")
    )
    assert f"CANCEL {timed_out}" in log, log

    # The session went on: more content after the last error, then SUCCESS.
    last_result = max(e.seq for e in events if kind(e) == "tool_result")
    after = "".join(e.content.text for e in events if kind(e) == "content" and e.seq > last_result)
    assert after == RECOVERED, describe(events)
    assert kind(events[-1]) == "state" and events[-1].state.status == agent_pb2.SUCCESS
    assert wait_status(d.agent, task_id).result == RECOVERED

    # The dead provider's tools are gone; the other provider's remain.
    names = d.tool_names()
    assert "test.hang" not in names and "test.hang_timeout" not in names
    assert "workspace.write_file" in names


def test_tools_listed(env: SimpleNamespace) -> None:
    resp = env.d.tasks.ListTools(tasks_pb2.ListToolsRequest(), timeout=5)
    by_name = dict(zip([t.name for t in resp.tools], resp.executors, strict=True))
    for builtin in ("calculator", "time_now", "sleep", "echo"):
        assert by_name.get(builtin) == "builtin", by_name
    for provided in (
        "workspace.write_file",
        "workspace.read_file",
        "workspace.list_files",
        "text.sha256",
    ):
        assert by_name.get(provided) not in (None, "builtin"), by_name
    for t in resp.tools:
        json.loads(t.parameters_json_schema)


def test_stop_cancels_a_pending_tool_call(env: SimpleNamespace, stack: Stack) -> None:
    """A stop while the planner waits for a tool (built-in sleep 30 s, or a provider
    tool that never answers) ends the task at once and cancels the call."""
    d = env.d
    hang = stack.hanging_provider(d)
    for llm, tool in ((env.sleepy, "sleep"), (env.hangy, "test.hang")):
        task_id = d.submit(f"wait on {tool} [{uuid.uuid4().hex[:8]}]", llm)
        watch = start_watch(d.tasks, task_id)
        calls = watch.wait(
            lambda evs: any(kind(e) == "tool_call" for e in evs), 20, f"{tool} called"
        )
        call_id = next(e.tool_call.call_id for e in calls if kind(e) == "tool_call")
        if tool == "test.hang":
            wait_until(lambda: "INVOKED test.hang " in hang.log_text(), 10, "invoked", procs=[hang])
        t0 = time.monotonic()
        resp = d.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task_id), timeout=10)
        assert resp.cancelled, resp
        watch.join(10)
        took = time.monotonic() - t0
        events = watch.values()
        assert kind(events[-1]) == "state", describe(events)
        assert events[-1].state.status == agent_pb2.CANCELLED, describe(events)
        assert "stopped" in [kind(e) for e in events], describe(events)
        print(f"\nstop while waiting on {tool}: task CANCELLED in {took * 1000:.0f} ms")
        assert took < 3, f"stop waited for the {tool} call ({took:.1f}s)"
        for e in events:
            if kind(e) == "tool_result" and e.tool_result.result.call_id == call_id:
                assert e.tool_result.result.HasField("error"), e
        if tool == "test.hang":
            inv = next(
                x.split()[2]
                for x in hang.log_text().splitlines()
                if x.startswith("INVOKED test.hang ")
            )
            wait_until(
                lambda inv=inv: f"CANCEL {inv}" in hang.log_text(),
                5,
                "provider told to cancel the invocation",
                procs=[hang],
            )
