"""Pure pieces: the <think> splitter, tool-name mapping, model resolution, schemas."""

from __future__ import annotations

import inspect
from typing import Any

import openai
import pytest

from commander import Commander, GuiSettings, LLMSettings, PlannerNotFoundError, PlannerRegistry
from commander._chat import ThinkSplitter, ToolNames, resolve_model
from commander._context import merge_usage
from commander._errors import tool_error_from_result
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.lybic.agent import agent_pb2
from commander._llm import ModelTarget, model_error
from commander._provider import schema_from_signature


def split_all(chunks: list[str]) -> list[tuple[bool, str]]:
    splitter = ThinkSplitter()
    pieces: list[tuple[bool, str]] = []
    for chunk in chunks:
        pieces += splitter.feed(chunk)
    pieces += splitter.flush()
    merged: list[tuple[bool, str]] = []
    for is_thought, text in pieces:
        if merged and merged[-1][0] == is_thought:
            merged[-1] = (is_thought, merged[-1][1] + text)
        else:
            merged.append((is_thought, text))
    return merged


@pytest.mark.parametrize(
    "chunks",
    [
        ["<think>plan</think>answer"],
        ["<", "think>pl", "an</", "think", ">ans", "wer"],
        ["<think>", "plan", "</think>", "answer"],
        list("<think>plan</think>answer"),
    ],
)
def test_think_tags_split_wherever_they_are_cut(chunks: list[str]) -> None:
    assert split_all(chunks) == [(True, "plan"), (False, "answer")]


def test_text_without_tags_passes_through_and_near_misses_are_not_held() -> None:
    assert split_all(["a < b", " and <thin", "g>"]) == [(False, "a < b and <thing>")]
    splitter = ThinkSplitter()
    assert splitter.feed("x <thi") == [(False, "x ")]  # only the possible tag is held
    assert splitter.feed("s") == [(False, "<this")]


def test_tool_names_map_reversibly() -> None:
    names = ToolNames(["computer.click", "computer__click", "a" * 80, "b/c", "echo"])
    mapped = {n: names.to_openai(n) for n in ["computer.click", "computer__click", "a" * 80]}
    assert mapped["computer.click"] == "computer__click"
    assert mapped["computer__click"] == "computer__click_2"
    assert len(mapped["a" * 80]) == 64
    for original, function_name in mapped.items():
        assert names.to_tool(function_name) == original
    assert names.to_openai("b/c") == "b_c" and names.to_tool("b_c") == "b/c"
    assert names.to_tool("invented") == "invented"


def llm_config(**kw: Any) -> agent_pb2.CommonConfig:
    return agent_pb2.CommonConfig(
        stageModelConfig=agent_pb2.StageModelConfig(actionGeneratorModel=agent_pb2.LLMConfig(**kw))
    )


def test_model_resolution() -> None:
    defaults = LLMSettings(base_url="http://local/v1", model="smollm2", api_key="none")
    plain = resolve_model(agent_pb2.CommonConfig(), defaults)
    assert (plain.base_url, plain.model, plain.api_key) == ("http://local/v1", "smollm2", "none")

    full = resolve_model(
        llm_config(modelName="m", apiKey="sk-1", apiEndpoint="https://x/v1"), defaults
    )
    assert (full.base_url, full.model, full.api_key) == ("https://x/v1", "m", "sk-1")
    assert "sk-1" not in repr(full)

    doubao = resolve_model(llm_config(modelName="doubao-1-5-ui-tars-250428"), defaults)
    assert doubao.base_url.startswith("https://ark.")
    # A provider's endpoint is the client's choice: the default key does not go there.
    assert doubao.api_key == "" and doubao.task_endpoint
    named = resolve_model(llm_config(modelName="x", provider="DeepSeek"), defaults)
    assert named.base_url == "https://api.deepseek.com/v1"
    unknown = resolve_model(llm_config(modelName="my-model"), defaults)
    assert unknown.base_url == "http://local/v1"


def test_schema_inference() -> None:
    def fn(
        name: str,
        count: int,
        ratio: float = 1.0,
        tags: list[str] | None = None,
        extra: dict[str, int] | None = None,
        flag: bool = False,
        anything: Any = None,
    ) -> None: ...

    schema = schema_from_signature(fn)
    assert schema["required"] == ["name", "count"]
    props = schema["properties"]
    assert props["name"] == {"type": "string"}
    assert props["count"] == {"type": "integer"}
    assert props["ratio"] == {"type": "number"}
    assert props["tags"] == {
        "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]
    }
    assert props["extra"] == {"anyOf": [{"type": "object"}, {"type": "null"}]}
    assert props["flag"] == {"type": "boolean"}
    assert props["anything"] == {}


def test_registry() -> None:
    registry = PlannerRegistry()

    @registry.register("mine")
    async def mine(ctx: Any) -> str:
        return "x"

    assert "mine" in registry and len(registry) == 1
    assert registry.capabilities() == ["planner:mine"]
    assert registry.get("mine") is mine
    with pytest.raises(PlannerNotFoundError):
        registry.get("other")
    with pytest.raises(ValueError):
        registry.register("bad name", mine)


def test_tool_errors_are_typed_by_code() -> None:
    result = ipb.ToolCallResult(
        call_id="c1",
        tool_name="t",
        error=ipb.ToolError(code=ipb.TOOL_ERROR_CODE_DENIED, message="policy"),
    )
    error = tool_error_from_result(result)
    assert type(error).__name__ == "ToolDeniedError"
    assert (error.message, error.tool_name, error.call_id) == ("policy", "t", "c1")
    unknown = tool_error_from_result(
        ipb.ToolCallResult(error=ipb.ToolError(code=99))  # type: ignore[arg-type]
    )
    assert type(unknown).__name__ == "ToolError" and unknown.message == "99"


def test_merge_usage() -> None:
    total = ipb.Usage(input_tokens=1, output_tokens=2, cost=0.5, steps=1, model="a")
    merge_usage(total, ipb.Usage(input_tokens=3, output_tokens=4, cost=0.25, steps=1, model="b"))
    assert (total.input_tokens, total.output_tokens, total.cost, total.steps, total.model) == (
        4,
        6,
        0.75,
        2,
        "b",
    )


def test_model_errors_carry_no_secrets() -> None:
    target = ModelTarget(
        base_url="https://user:pw@api.example.com/v1?key=abc", model="m", api_key="secret-key-1"
    )
    exc = openai.OpenAIError("Incorrect API key provided: secret-key-1 (sk-proj-abcdef****wxyz)")
    message = str(model_error(exc, target))
    assert "secret-key-1" not in message and "sk-proj" not in message
    assert "user" not in message and "pw@" not in message and "key=abc" not in message
    assert message.startswith("model m at https://api.example.com/v1: Incorrect API key")


def test_stop_bounds_nest_inner_first() -> None:
    """The model stream's close fits inside the planner-cancel wait, which fits inside
    the dispatcher's --stop-grace (2 s): an outer wait never gives up on an inner
    cleanup that would still report usage."""
    stop_cancel = inspect.signature(Commander).parameters["stop_cancel_timeout"].default
    assert LLMSettings().close_timeout < stop_cancel
    assert GuiSettings().close_timeout < stop_cancel
    assert stop_cancel < 2.0
