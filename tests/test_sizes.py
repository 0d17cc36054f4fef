"""Issue 12, class 5 across processes: a tool result over the message limit
ends that call with an error result, not the provider's stream, so the same
provider's other call in flight (another task's) still gets its answer."""

from __future__ import annotations

import uuid

import pytest

from commander._gen.dispatch.v1 import interaction_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, wait_status, watch_all
from tests._procs import wait_until
from tests.conftest import Stack
from tests.scripted import tool_call

pytestmark = pytest.mark.e2e


def test_a_6_mib_tool_result_fails_its_call_only(stack: Stack) -> None:
    held_llm = stack.scripted(
        [{"tool_calls": [tool_call("test.held", {})]}, {"content": "held call done"}]
    )
    big_llm = stack.scripted(
        [{"tool_calls": [tool_call("test.big", {})]}, {"content": "big call done"}]
    )
    d = stack.dispatcher()
    provider = stack.raw_provider(d, "tests._big_provider", "test.big")
    stack.commander(d, held_llm.base_url, slots=2, wait_slots=2)

    held = d.submit(f"hold a call [{uuid.uuid4().hex[:8]}]", held_llm)
    wait_until(
        lambda: "INVOKED test.held" in provider.log_text(),
        30,
        "the held call in flight on the provider",
        procs=[provider, d.proc],
    )
    big = d.submit(f"read a huge file [{uuid.uuid4().hex[:8]}]", big_llm)

    big_events = watch_all(d.tasks, big, timeout=60)
    results = [e.tool_result for e in big_events if kind(e) == "tool_result"]
    assert len(results) == 1, describe(big_events)
    error = results[0].result.error
    assert error.code == interaction_pb2.TOOL_ERROR_CODE_EXECUTION_FAILED, results[0]
    assert "exceeds the limit of" in error.message, error.message
    assert wait_status(d.agent, big).status == agent_pb2.SUCCESS

    # The same provider stream answered the other task's call.
    held_events = watch_all(d.tasks, held, timeout=60)
    results = [e.tool_result for e in held_events if kind(e) == "tool_result"]
    assert len(results) == 1, describe(held_events)
    assert not results[0].result.HasField("error"), results[0]
    assert "answered" in results[0].result.result_json
    assert wait_status(d.agent, held).status == agent_pb2.SUCCESS

    log = provider.log_text()
    assert provider.alive(), log
    assert log.count("WELCOME") == 1 and "STREAM ENDED" not in log, log
    assert "test.big" in d.tool_names()
    # The welcome announced the limit the provider should have checked.
    welcome = next(line for line in log.splitlines() if line.startswith("WELCOME"))
    assert welcome.split()[-1] == str(4 * 1024 * 1024 - 4 * 1024), welcome
