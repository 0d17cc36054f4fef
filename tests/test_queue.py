"""The task queue is bounded: when it is full, submission is refused with
RESOURCE_EXHAUSTED instead of growing without limit."""

from __future__ import annotations

import grpc
import pytest

from commander._gen.dispatch.v1 import tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import start_task_stream, wait_status
from tests.conftest import Stack

pytestmark = pytest.mark.e2e


def test_queue_full_is_resource_exhausted(stack: Stack) -> None:
    llm = stack.scripted([{"content": "drained"}])
    d = stack.dispatcher("--queue-size", "2")
    assert d.slots() == 0
    first = d.agent.RunAgentInstructionAsync(
        agent_pb2.RunAgentInstructionRequest(instruction="one"), timeout=5
    ).taskId
    second = d.tasks.SubmitTask(tasks_pb2.SubmitTaskRequest(instruction="two"), timeout=5).task_id
    # A seed-000 stream opened while the task waits in the queue follows it to the end.
    pending_stream = start_task_stream(d.agent, second)
    for task_id in (first, second):
        status = d.agent.QueryTaskStatus(
            agent_pb2.QueryTaskStatusRequest(taskId=task_id), timeout=5
        )
        assert status.status == agent_pb2.PENDING, status

    # Full: both APIs refuse, and nothing is queued by the refusal.
    with pytest.raises(grpc.RpcError) as info:
        d.agent.RunAgentInstructionAsync(
            agent_pb2.RunAgentInstructionRequest(instruction="three"), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    with pytest.raises(grpc.RpcError) as info:
        d.tasks.SubmitTask(tasks_pb2.SubmitTaskRequest(instruction="three"), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    with pytest.raises(grpc.RpcError) as info:
        for _ in d.agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction="three"), timeout=5
        ):
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    listed = d.tasks.ListTasks(tasks_pb2.ListTasksRequest(), timeout=5).tasks
    assert sorted(t.task_id for t in listed) == sorted([first, second]), listed

    # Cancelling a pending task frees its place.
    cancel = d.agent.CancelTask(agent_pb2.CancelTaskRequest(taskId=first), timeout=5)
    assert cancel.success is True, cancel
    assert wait_status(d.agent, first, timeout=5).status == agent_pb2.CANCELLED
    third = d.tasks.SubmitTask(tasks_pb2.SubmitTaskRequest(instruction="three"), timeout=5).task_id

    # A commander drains the queue; the cancelled task is not run.
    stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    for task_id in (second, third):
        status = wait_status(d.agent, task_id, timeout=30)
        assert status.status == agent_pb2.SUCCESS and status.result == "drained", status
    assert wait_status(d.agent, first, timeout=1).status == agent_pb2.CANCELLED
    pending_stream.join(10)
    stages = [t.stage for t in pending_stream.values()]
    assert stages[0] == "pending" and "running" in stages, stages
    assert stages[-1] == "final" and pending_stream.values()[-1].message == "drained", stages
    assert len(llm.streams()) == 2
