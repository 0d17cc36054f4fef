"""The ``a2a`` planner's pure parts: which agent a task may use, and how a remote
stream becomes our planner outputs (the process-level tests are tests/test_a2a_planner.py)."""

from __future__ import annotations

import pytest
from a2a.types.a2a_pb2 import (
    Artifact,
    Message,
    Part,
    StreamResponse,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)

from commander._a2a import A2AError, A2ASettings, _Relay, parse_agents, pick_agent
from commander._gen.dispatch.v1 import interaction_pb2 as ipb

AGENTS = A2ASettings(allowed_agents=parse_agents("http://a.test:1/, http://b.test:2"))


def test_pick_agent_only_from_the_list() -> None:
    assert AGENTS.allowed_agents == ("http://a.test:1", "http://b.test:2")
    assert pick_agent(AGENTS, {}) == "http://a.test:1"
    assert pick_agent(AGENTS, {"a2a_agent": "http://b.test:2/"}) == "http://b.test:2"
    with pytest.raises(A2AError, match="not on --a2a-agents"):
        pick_agent(AGENTS, {"a2a_agent": "http://169.254.169.254"})
    with pytest.raises(A2AError, match="no remote A2A agents"):
        pick_agent(A2ASettings(), {})


def status(state: TaskState, text: str = "") -> StreamResponse:
    msg = Message(parts=[Part(text=text)]) if text else None
    st = TaskStatus(state=state, message=msg) if msg else TaskStatus(state=state)
    return StreamResponse(status_update=TaskStatusUpdateEvent(task_id="r1", status=st))


def chunk(text: str, last: bool = False) -> StreamResponse:
    art = Artifact(artifact_id="a", parts=[Part(text=text)])
    return StreamResponse(
        artifact_update=TaskArtifactUpdateEvent(task_id="r1", artifact=art, last_chunk=last)
    )


def test_relay_maps_a_remote_stream() -> None:
    r = _Relay()
    first = StreamResponse(
        task=Task(id="r1", context_id="c1", status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED))
    )
    outs = [
        o for ev in (first, status(TaskState.TASK_STATE_WORKING, "thinking")) for o in r.take(ev)
    ]
    assert (r.task_id, r.context_id) == ("r1", "c1")
    assert outs == [ipb.StageChange(stage="working", message="thinking")]
    assert r.take(chunk("Hel")) == [ipb.ContentChunk(text="Hel")]
    assert r.take(chunk("lo", last=True)) == [ipb.ContentChunk(text="lo", is_finish=True)]
    raw = Artifact(
        artifact_id="s", name="screenshot", parts=[Part(raw=b"\x89PNG", media_type="image/png")]
    )
    (shot,) = r.take(StreamResponse(artifact_update=TaskArtifactUpdateEvent(artifact=raw)))
    assert shot == ipb.Artifact(kind="screenshot", mime_type="image/png", data=b"\x89PNG")
    assert r.final is None
    r.take(status(TaskState.TASK_STATE_COMPLETED))
    assert r.final == ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="Hello")


@pytest.mark.parametrize(
    ("state", "word"),
    [
        (TaskState.TASK_STATE_FAILED, "failed"),
        (TaskState.TASK_STATE_REJECTED, "rejected"),
        (TaskState.TASK_STATE_CANCELED, "canceled"),
    ],
)
def test_relay_remote_failure_is_ours(state: TaskState, word: str) -> None:
    r = _Relay()
    r.take(status(state, "no"))
    assert r.final is not None and r.final.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert r.final.message == f"remote task {word}: no"


def test_relay_input_required_is_call_user() -> None:
    r = _Relay()
    assert r.take(status(TaskState.TASK_STATE_INPUT_REQUIRED, "which file?")) == [
        ipb.StageChange(stage="call_user", message="which file?")
    ]
    assert r.waiting and r.final is None
