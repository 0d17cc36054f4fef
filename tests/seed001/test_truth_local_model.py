"""Truth rules (a) and (b) with the real local model: SmolLM2-135M-Instruct behind
llama-cpp-python's server, 4,096-token context (`make test-model` starts it and sets
LOCAL_LLM_BASE_URL; skipped without it). The case of issue 14: a 90 KB instruction
came back in 0.2 s as an empty success, named after the global config's model."""

from __future__ import annotations

import os
import uuid
from types import SimpleNamespace

import pytest

from commander._gen.dispatch.v1 import tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import kind, wait_status
from tests.conftest import Stack
from tests.seed001._stack import http_base
from tests.seed001.test_truth import BIG, seed_status, sse, watch_all
from tests.test_local_model import BASE_URL, MODEL, _model_server_up

pytestmark = [pytest.mark.e2e, pytest.mark.model]

GLOBAL_MODEL = "claude-sonnet-4-20250514"
REASON = "maximum context length is 4096 tokens"


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    why = _model_server_up()
    if why:
        pytest.skip(why)
    d = module_stack.dispatcher("--http-listen", "127.0.0.1:0")
    module_stack.commander(
        d, BASE_URL, model=MODEL, slots=1, wait_slots=1, allowed_endpoints=[BASE_URL]
    )
    # Seed 000's example sets the global action model; SmolLM2 still runs.
    d.agent.SetGlobalCommonLLMConfig(
        agent_pb2.SetGlobalCommonLLMConfigRequest(
            llmConfig=agent_pb2.LLMConfig(modelName=GLOBAL_MODEL)
        ),
        timeout=5,
    )
    return SimpleNamespace(d=d, base=http_base(d))


def test_90kb_instruction_fails_with_the_reason_on_every_api(env: SimpleNamespace) -> None:
    big = f"{BIG} [{uuid.uuid4().hex[:8]}]"
    stream = list(
        env.d.agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction=big), timeout=120
        )
    )
    assert stream[-1].stage == "failure" and REASON in stream[-1].message, stream[-1]
    st = wait_status(env.d.agent, stream[-1].taskId)
    assert st.status == agent_pb2.FAILURE and REASON in st.message and st.result == "", st

    sub = env.d.tasks.SubmitTask(tasks_pb2.SubmitTaskRequest(instruction=big), timeout=10)
    assert not [e for e in watch_all(env, sub.task_id) if kind(e) == "content"]
    task = env.d.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=sub.task_id), timeout=5).task
    assert task.status == agent_pb2.FAILURE and REASON in task.message, task.message

    events = sse(env.base, {"instruction": big})
    assert events[-1]["type"] == "error" and REASON in events[-1]["content"], events[-1]
    assert seed_status(env.base, events[-1]["task_id"])["status"] == "error"


def test_the_message_names_smollm2(env: SimpleNamespace) -> None:
    stream = list(
        env.d.agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction="Say hello in one short sentence."),
            timeout=120,
        )
    )
    assert stream[-1].stage == "final", [s.stage for s in stream]
    st = wait_status(env.d.agent, stream[-1].taskId)
    want = f"model {os.environ.get('LOCAL_LLM_MODEL', 'smollm2')} (requested {GLOBAL_MODEL})"
    assert st.message.endswith(want), st.message
    events = sse(env.base, {"instruction": "Say hi."}, "?events=all")
    usage = [e for e in events if e["type"] == "usage"]
    assert usage and all(u["model"] == MODEL for u in usage), usage
