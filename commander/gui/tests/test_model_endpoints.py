"""The gui planner sends the operator's key only to the operator's endpoint.

As the chat planner (commander/tests/test_model_endpoints.py): an endpoint a
task names must be on the allowlist and gets the task's own key or none; a
refused one fails the session before a sandbox is acquired or a request sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.lybic.agent import agent_pb2
from commander._llm import ModelTarget
from commander.gui._planner import GuiSettings, resolve_models
from commander.gui.tests.test_planner import USAGE, FakeSandbox, drive, uitars
from commander.tests.fakes import FakeSlot, Reply, ScriptedLLM

pytestmark = pytest.mark.anyio

OPERATOR_KEY = "sk-gui-operator-secret-42"

Start = Callable[..., Awaitable[FakeSlot]]


@pytest.fixture
def start(make: Start) -> Start:
    """A GUI slot (conftest's ``make``) whose operator key is OPERATOR_KEY."""

    async def with_key(**settings: Any) -> FakeSlot:
        settings.setdefault("api_key", OPERATOR_KEY)
        return await make(**settings)

    return with_key


def config(
    endpoint: str, *, key: str | None = None, grounding: str | None = None
) -> agent_pb2.CommonConfig:
    action = agent_pb2.LLMConfig(modelName="task-gui-model", apiEndpoint=endpoint)
    if key is not None:
        action.apiKey = key
    stages = agent_pb2.StageModelConfig(fastActionGeneratorModel=action)
    mode = agent_pb2.FAST
    if grounding is not None:
        mode = agent_pb2.NORMAL
        stages = agent_pb2.StageModelConfig(
            actionGeneratorModel=action,
            groundingModel=agent_pb2.LLMConfig(modelName="grounder", apiEndpoint=grounding),
        )
    return agent_pb2.CommonConfig(mode=mode, stageModelConfig=stages)


def assert_refused(packets: list[ipb.UpstreamPacket], because: str) -> None:
    assert [p.WhichOneof("payload") for p in packets] == ["error", "result"], packets
    assert packets[0].error.code == "model_endpoint_not_allowed"
    assert packets[0].error.message.startswith("model endpoint not allowed: ")
    assert because in packets[0].error.message
    assert packets[1].result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert packets[1].result.message == packets[0].error.message


async def test_a_task_naming_another_endpoint_is_refused_before_the_sandbox(
    start: Start, llm: ScriptedLLM, other: ScriptedLLM
) -> None:
    slot = await start()
    sandbox = FakeSandbox()
    sid = await slot.start("x", planner="gui", config=config(other.base_url))
    packets = await drive(slot, sid, sandbox)
    assert_refused(packets, "allowlist")
    assert sandbox.calls == []  # no sandbox acquired
    assert other.streams == [] and llm.streams == []


async def test_a_grounding_model_on_another_endpoint_is_refused(
    start: Start, llm: ScriptedLLM, other: ScriptedLLM
) -> None:
    slot = await start()
    sandbox = FakeSandbox()
    task = config(llm.base_url, grounding=other.base_url)
    sid = await slot.start("x", planner="gui", config=task)
    packets = await drive(slot, sid, sandbox)
    assert_refused(packets, other.base_url)
    assert sandbox.calls == [] and other.streams == [] and llm.streams == []


async def test_metadata_is_refused_even_if_allowlisted(start: Start, llm: ScriptedLLM) -> None:
    metadata = "http://169.254.169.254/openai/v1"
    slot = await start(allowed_endpoints=(metadata,))
    sandbox = FakeSandbox()
    sid = await slot.start("x", planner="gui", config=config(metadata))
    packets = await drive(slot, sid, sandbox)
    assert_refused(packets, "link-local")
    assert sandbox.calls == []


async def test_an_allowlisted_endpoint_gets_no_operator_key(
    start: Start, llm: ScriptedLLM, other: ScriptedLLM
) -> None:
    other.replies = [
        uitars("click(point='<point>1 1</point>')", thought="Click OK."),
        Reply.text("<point>500 500</point>", usage=USAGE),
        uitars("finished()"),
    ]
    slot = await start(allowed_endpoints=(other.base_url,))
    sid = await slot.start(
        "x", planner="gui", config=config(other.base_url, grounding=other.base_url)
    )
    packets = await drive(slot, sid, FakeSandbox())
    assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS, packets[-1]
    assert [s.request["model"] for s in other.streams] == [
        "task-gui-model",
        "grounder",
        "task-gui-model",
    ]
    for record in other.streams:
        assert "authorization" not in record.headers, record.headers
    assert llm.streams == []


async def test_the_default_endpoint_still_gets_the_operator_key(
    start: Start, llm: ScriptedLLM
) -> None:
    llm.replies = [uitars("finished(content='done')")]
    slot = await start()
    sid = await slot.start("x", planner="gui")
    packets = await drive(slot, sid, FakeSandbox())
    assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert llm.streams[0].headers["authorization"] == f"Bearer {OPERATOR_KEY}"


def test_keys_stay_with_their_endpoints() -> None:
    grounding = ModelTarget("http://grounder:8000/v1", "g0", "sk-grounding-op")
    settings = GuiSettings(
        base_url="http://default/v1", model="m0", api_key="sk-op", grounding=grounding
    )
    normal = agent_pb2.CommonConfig(
        mode=agent_pb2.NORMAL,
        stageModelConfig=agent_pb2.StageModelConfig(
            actionGeneratorModel=agent_pb2.LLMConfig(
                modelName="a", apiEndpoint="https://task.example/v1", apiKey="sk-task"
            ),
            groundingModel=agent_pb2.LLMConfig(modelName="g", apiEndpoint="https://g.example/v1"),
        ),
    )
    action, ground, _ = resolve_models(normal, settings)
    assert (action.api_key, action.task_endpoint) == ("sk-task", True)
    # The task's key does not follow to the grounding model's other endpoint either.
    assert ground is not None and (ground.api_key, ground.task_endpoint) == ("", True)
    # A grounding model naming no endpoint shares the action model's, key included.
    normal.stageModelConfig.groundingModel.ClearField("apiEndpoint")
    _, ground, _ = resolve_models(normal, settings)
    assert ground is not None
    assert (ground.base_url, ground.api_key) == ("https://task.example/v1", "sk-task")
    # Naming the operator's grounding endpoint: the operator's grounding key.
    normal.stageModelConfig.groundingModel.apiEndpoint = "http://GROUNDER:8000/v1/"
    _, ground, _ = resolve_models(normal, settings)
    assert ground is not None
    assert (ground.api_key, ground.task_endpoint) == ("sk-grounding-op", False)
    # A stripped key (after a restart) on a foreign endpoint: no key at all.
    normal.stageModelConfig.actionGeneratorModel.ClearField("apiKey")
    action, _, _ = resolve_models(normal, settings)
    assert (action.api_key, action.task_endpoint) == ("", True)
