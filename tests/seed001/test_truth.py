"""The truth rules of issue 14, each on every client API (seed 000 gRPC, TaskService,
seed 001 REST/SSE), with real processes:

(a) an instruction the model cannot take (90 KB, past a 4,096-token context, answered
    as llama-cpp-python answers it: an empty 200 stream) ends FAILURE / "error" with
    the server's reason, never an empty success;
(b) the finished message and the usage name the model that ran (the scripted server
    lists one model, "scripted", and answers to any requested name, as
    llama-cpp-python does), not only the global config's model name;
(c) a planner no commander serves is refused at submit when the deployment lists its
    planners (--planners), and a pending task nobody can run ends FAILURE after the
    queue timeout (--queue-timeout) with the reason: never pending forever.
"""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import requests

from commander._gen.dispatch.v1 import tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import kind, start_watch, wait_status
from tests.conftest import Stack
from tests.seed001._stack import http_base, scripted_with_context

pytestmark = pytest.mark.e2e

ANSWER = "The answer is 4."
GLOBAL_MODEL = "claude-sonnet-4-20250514"
BIG = "Please summarise this text. " + ("lorem ipsum dolor sit amet " * 3400)  # ~92 KB


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    llm = scripted_with_context(module_stack, [{"content": ANSWER}], context_tokens=4096)
    d = module_stack.dispatcher(
        "--http-listen",
        "127.0.0.1:0",
        "--planners",
        "chat,gui,browser",
        "--queue-timeout",
        "1s",
    )
    module_stack.commander(d, llm.base_url, slots=2, wait_slots=2)
    # The global config names a model the endpoint does not have (seed 000's example).
    d.agent.SetGlobalCommonLLMConfig(
        agent_pb2.SetGlobalCommonLLMConfigRequest(
            llmConfig=agent_pb2.LLMConfig(modelName=GLOBAL_MODEL)
        ),
        timeout=5,
    )
    # No commander at all, tasks of the default planner: only the queue timeout ends them.
    lone = module_stack.dispatcher("--http-listen", "127.0.0.1:0", "--queue-timeout", "1s")
    return SimpleNamespace(llm=llm, d=d, base=http_base(d), lone=lone, lone_base=http_base(lone))


def unique(text: str) -> str:
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def sse(base: str, body: dict[str, Any], query: str = "") -> list[dict[str, Any]]:
    r = requests.post(f"{base}/api/agent/run{query}", json=body, stream=True, timeout=60)
    r.raise_for_status()
    out, named = [], False
    for line in r.iter_lines():
        if line.startswith(b"event: "):
            named = True  # event: end (with ?events=all): not a task event
        elif line.startswith(b"data: ") and not named:
            out.append(json.loads(line[6:]))
        elif not line:
            named = False
    return out


def seed_status(base: str, task_id: str) -> dict[str, Any]:
    r = requests.get(f"{base}/api/agent/task/status/{task_id}", timeout=10)
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


# ------------------------------------------------------------------ (a) too large


CONTEXT_REASON = "maximum context length is 4096 tokens"


def test_a_too_large_instruction_fails_on_seed000(env: SimpleNamespace) -> None:
    stream = list(
        env.d.agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction=unique(BIG)), timeout=60
        )
    )
    stages = [s.stage for s in stream]
    assert "final" not in stages, stages
    assert stream[-1].stage == "failure" and CONTEXT_REASON in stream[-1].message, stream[-1]
    st = wait_status(env.d.agent, stream[-1].taskId)
    assert st.status == agent_pb2.FAILURE and CONTEXT_REASON in st.message, st
    assert st.result == ""


def test_a_too_large_instruction_fails_on_taskservice(env: SimpleNamespace) -> None:
    sub = env.d.tasks.SubmitTask(tasks_pb2.SubmitTaskRequest(instruction=unique(BIG)), timeout=10)
    events = watch_all(env, sub.task_id)
    assert not [e for e in events if kind(e) == "content"], "content from a refused request"
    task = env.d.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=sub.task_id), timeout=5).task
    assert task.status == agent_pb2.FAILURE and CONTEXT_REASON in task.message, task
    assert task.statistics.outputTokens == 0, task.statistics


def test_a_too_large_instruction_fails_on_seed001(env: SimpleNamespace) -> None:
    events = sse(env.base, {"instruction": unique(BIG)})
    assert events[-1]["type"] == "error" and CONTEXT_REASON in events[-1]["content"], events
    assert all(e["type"] not in ("finished", "result") for e in events), events
    st = seed_status(env.base, events[-1]["task_id"])
    assert st["status"] == "error" and CONTEXT_REASON in st["error_message"], st


# ------------------------------------------------------------------ (b) the model that ran


RAN = f"model scripted (requested {GLOBAL_MODEL})"


def test_b_model_that_ran_on_seed000(env: SimpleNamespace) -> None:
    stream = list(
        env.d.agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction=unique("What is 2+2?")), timeout=60
        )
    )
    assert stream[-1].stage == "final" and stream[-1].message == ANSWER, stream[-1]
    st = wait_status(env.d.agent, stream[-1].taskId)
    assert st.status == agent_pb2.SUCCESS and st.message.endswith(RAN), st.message
    # What the model server was asked for is still the global config's name.
    assert {r["model"] for r in env.llm.streams()} >= {GLOBAL_MODEL}


def test_b_model_that_ran_on_taskservice(env: SimpleNamespace) -> None:
    sub = env.d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction=unique("What is 2+2?")), timeout=10
    )
    events = watch_all(env, sub.task_id)
    usages = [e.usage for e in events if kind(e) == "usage"]
    assert usages and all(u.model == "scripted" for u in usages), usages
    task = env.d.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=sub.task_id), timeout=5).task
    assert task.status == agent_pb2.SUCCESS and task.message.endswith(RAN), task.message
    assert list(task.models) == ["scripted"], task.models


def test_b_model_that_ran_on_seed001(env: SimpleNamespace) -> None:
    events = sse(env.base, {"instruction": unique("What is 2+2?")}, "?events=all")
    usage = [e for e in events if e["type"] == "usage"]
    assert usage and all(u["model"] == "scripted" for u in usage), usage
    assert events[-1]["type"] == "finished" and events[-1]["content"].endswith(RAN), events[-1]
    st = seed_status(env.base, events[-1]["task_id"])
    assert st["status"] == "finished" and st["message"].endswith(RAN), st
    assert st["statistics"]["models"] == ["scripted"], st["statistics"]


# ------------------------------------------------------------------ (c) nobody serves it


def test_c_unknown_planner_refused_at_submit(env: SimpleNamespace) -> None:
    with pytest.raises(grpc.RpcError) as err:
        env.d.tasks.SubmitTask(
            tasks_pb2.SubmitTaskRequest(instruction="x", planner="no-such"), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'planner "no-such"' in (err.value.details() or "")
    r = requests.post(
        f"{env.base}/api/agent/task/submit",
        json={"instruction": "x", "planner": "no-such"},
        timeout=10,
    )
    assert r.status_code == 400 and 'planner "no-such"' in r.json()["error"], r.text


def test_c_known_planner_nobody_serves_fails_after_the_queue_timeout(
    env: SimpleNamespace,
) -> None:
    # TaskService: "browser" is one of --planners, but no commander serves it.
    sub = env.d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction="x", planner="browser"), timeout=5
    )
    task = wait_task_end(env, sub.task_id)
    assert task.status == agent_pb2.FAILURE, task
    assert "no connected commander serves planner:browser" in task.message, task.message
    assert "--queue-timeout" in task.message
    # seed 001: the stream ends "error" with the reason.
    events = sse(env.base, {"instruction": "x", "planner": "browser"})
    assert events[-1]["type"] == "error", events
    assert "planner:browser" in events[-1]["content"], events[-1]
    # seed 000 names no planner: a dispatcher whose default planner nobody serves.
    stream = list(
        env.lone.agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction="x"), timeout=30
        )
    )
    assert stream[-1].stage == "failure", [s.stage for s in stream]
    assert "no connected commander serves planner:chat" in stream[-1].message, stream[-1]


def watch_all(env: SimpleNamespace, task_id: str) -> list[Any]:
    """The task's events (WatchTask) until its end."""
    stream = start_watch(env.d.tasks, task_id)
    stream.join(60)
    assert stream.error is None, stream.error
    return stream.values()


def wait_task_end(env: SimpleNamespace, task_id: str) -> Any:
    assert watch_all(env, task_id), "no events"
    return env.d.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id), timeout=5).task
