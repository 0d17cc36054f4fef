"""Credentials never follow a client-chosen endpoint, end to end: a task naming a
model endpoint that is not on the commander's allowlist ends FAILURE with the
reason and no request reaches that endpoint; a task naming none still runs on
the commander's default endpoint (the README path)."""

from __future__ import annotations

import pytest

from commander._gen.dispatch.v1 import tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, wait_status, watch_all
from tests.conftest import Stack

pytestmark = pytest.mark.e2e


def test_a_task_endpoint_off_the_allowlist_fails_with_the_reason(stack: Stack) -> None:
    default = stack.scripted([{"content": "from the default endpoint"}])
    foreign = stack.scripted([{"content": "must never be asked"}])
    d = stack.dispatcher()
    stack.commander(d, default.base_url, slots=1, wait_slots=1, allowed_endpoints=[])

    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(
            instruction="use my endpoint", running_config=foreign.model_config()
        ),
        timeout=5,
    ).task_id
    events = watch_all(d.tasks, task_id, timeout=30)
    assert kind(events[-1]) == "state", describe(events)
    assert events[-1].state.status == agent_pb2.FAILURE, describe(events)
    errors = [e.error.message for e in events if kind(e) == "error"]
    assert any(m.startswith("model endpoint not allowed: ") for m in errors), describe(events)
    status = wait_status(d.agent, task_id, timeout=10)
    assert status.status == agent_pb2.FAILURE, status
    assert "model endpoint not allowed" in status.message, status
    assert foreign.streams() == []

    # The default path is unchanged: no endpoint named → the default endpoint.
    status = wait_status(
        d.agent,
        d.agent.RunAgentInstructionAsync(
            agent_pb2.RunAgentInstructionRequest(instruction="hello"), timeout=5
        ).taskId,
        timeout=30,
    )
    assert status.status == agent_pb2.SUCCESS, status
    assert status.result == "from the default endpoint"
    assert len(default.streams()) == 1 and foreign.streams() == []
