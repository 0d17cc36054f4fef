"""The chat planner against the scripted OpenAI-compatible server."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable

import anyio
import pytest

from commander import ChatPlanner, Commander, LLMSettings
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.lybic.agent import agent_pb2
from commander._session import Session
from commander._writer import Outgoing
from commander.tests.fakes import DispatcherServer, Reply, ScriptedLLM

pytestmark = pytest.mark.anyio

SHA_TOOL = ipb.ToolSpec(
    name="text.sha256",
    description="hash a text",
    parameters_json_schema=json.dumps(
        {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    ),
)
ECHO_TOOL = ipb.ToolSpec(name="echo", description="echo", parameters_json_schema="")
CLICK_TOOL = ipb.ToolSpec(name="computer.click", description="click", parameters_json_schema="")


def kinds(packets: list[ipb.UpstreamPacket]) -> list[str]:
    return [p.WhichOneof("payload") or "" for p in packets]


async def test_reasoning_is_thought_and_the_answer_is_content(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies.append(
        Reply(
            [
                {"reasoning_content": "The user greets. "},
                {"reasoning_content": "Greet back."},
                {"content": "<thi"},
                {"content": "nk>more thinking</th"},
                {"content": "ink>Hello"},
                {"content": ", friend"},
            ],
            usage={"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17},
        )
    )
    async with make_commander():
        slot = await dispatcher.servicer.next_slot()
        await slot.start("hi")
        packets = await slot.recv_until_terminal()
    thoughts = "".join(p.thought.delta for p in packets if p.HasField("thought"))
    content = [p.content for p in packets if p.HasField("content")]
    assert thoughts == "The user greets. Greet back.more thinking"
    assert all(p.thought.step_name == "Reasoning" for p in packets if p.HasField("thought"))
    assert "".join(c.text for c in content) == "Hello, friend"
    # Chunks that wait for the writer together may go out as one packet
    # (coalescing): only the last content packet carries is_finish.
    assert [c.is_finish for c in content] == [False] * (len(content) - 1) + [True]
    # the finish chunk comes before the turn's usage, the result last
    assert kinds(packets)[-3:] == ["content", "usage", "result"]
    usage = packets[-2].usage
    assert (usage.input_tokens, usage.output_tokens, usage.steps) == (11, 6, 1)
    assert usage.model == "test-model"
    result = packets[-1].result
    assert result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert result.result == "Hello, friend"
    request = llm.requests[0]
    assert request["model"] == "test-model"
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert request["messages"] == [{"role": "user", "content": "hi"}]
    assert "tools" not in request


async def test_usage_is_estimated_when_the_server_sends_none(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies.append(Reply.text("one two three four"))
    async with make_commander():
        slot = await dispatcher.servicer.next_slot()
        await slot.start("count to four")
        packets = await slot.recv_until_terminal()
    usage = next(p.usage for p in packets if p.HasField("usage"))
    assert usage.output_tokens == 4  # one per streamed piece
    assert usage.input_tokens > 0
    assert usage.steps == 1


async def test_history_config_and_tools_shape_the_request(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies.append(Reply.text("ok"))
    config = agent_pb2.CommonConfig(
        stageModelConfig=agent_pb2.StageModelConfig(
            actionGeneratorModel=agent_pb2.LLMConfig(
                modelName="task-model", apiKey="sk-task", apiEndpoint=llm.base_url
            )
        )
    )
    history = [
        ipb.ConversationTurn(role="user", content="earlier question"),
        ipb.ConversationTurn(role="assistant", content="earlier answer"),
    ]
    settings = LLMSettings(
        base_url="http://127.0.0.1:9/v1",
        exclude_tool_prefixes=("computer.",),
        allowed_endpoints=(llm.base_url,),  # the task names its own endpoint
    )
    async with make_commander(llm=settings):
        slot = await dispatcher.servicer.next_slot()
        await slot.start(
            "now", config=config, history=history, tools=[SHA_TOOL, CLICK_TOOL, ECHO_TOOL]
        )
        packets = await slot.recv_until_terminal()
    assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    request = llm.requests[0]
    assert request["model"] == "task-model"
    assert request["messages"] == [
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "now"},
    ]
    functions = [t["function"] for t in request["tools"]]
    # Excluded by prefix (the stack does this for SmolLM2's small context).
    assert [f["name"] for f in functions] == ["text__sha256", "echo"]
    assert functions[0]["parameters"]["required"] == ["text"]
    assert functions[1]["parameters"] == {"type": "object", "properties": {}}


async def test_tool_calls_round_trip_by_call_id_and_errors_let_it_continue(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies += [
        Reply.tool_call("text__sha256", {"text": "abc"}, call_id="call_a"),
        Reply.tool_call("echo", {"x": 1}, call_id="call_b"),
        Reply.text("all done"),
    ]
    async with make_commander():
        slot = await dispatcher.servicer.next_slot()
        session_id = await slot.start("hash it", tools=[SHA_TOOL, ECHO_TOOL])

        first = (await slot.recv_kind("tool_call")).tool_call
        assert first.tool_name == "text.sha256"  # mapped back from text__sha256
        assert json.loads(first.arguments_json) == {"text": "abc"}
        assert first.call_id
        await slot.tool_result(
            session_id, first, code=ipb.TOOL_ERROR_CODE_TIMEOUT, message="took too long"
        )

        second = (await slot.recv_kind("tool_call")).tool_call
        assert second.tool_name == "echo"
        assert second.call_id != first.call_id
        # An answer for an unknown call id is ignored; the real one is matched by id.
        stray = ipb.ToolCallRequest(call_id="nope", tool_name="echo")
        await slot.tool_result(session_id, stray, result_json='"stray"')
        await slot.tool_result(session_id, second, result_json='{"x": 1}')

        packets = await slot.recv_until_terminal()
    assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert packets[-1].result.result == "all done"
    assert "2 tool call(s)" in packets[-1].result.message
    assert len(llm.requests) == 3

    second_request = llm.requests[1]["messages"]
    assert second_request[-2]["tool_calls"][0]["id"] == "call_a"
    assert second_request[-2]["tool_calls"][0]["function"]["name"] == "text__sha256"
    assert second_request[-1]["role"] == "tool"
    assert second_request[-1]["tool_call_id"] == "call_a"
    assert json.loads(second_request[-1]["content"]) == {
        "error": {"code": "TIMEOUT", "message": "took too long"}
    }
    third_request = llm.requests[2]["messages"]
    assert third_request[-1] == {"role": "tool", "tool_call_id": "call_b", "content": '{"x": 1}'}


async def test_user_input_is_appended_at_the_next_turn(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies += [Reply.tool_call("echo", {}), Reply.text("noted")]
    async with make_commander():
        slot = await dispatcher.servicer.next_slot()
        session_id = await slot.start("go", tools=[ECHO_TOOL])
        call = (await slot.recv_kind("tool_call")).tool_call
        await slot.user_input(session_id, "also, be brief")
        await slot.tool_result(session_id, call, result_json="{}")
        packets = await slot.recv_until_terminal()
    assert packets[-1].result.result == "noted"
    messages = llm.requests[1]["messages"]
    assert messages[-1] == {"role": "user", "content": "also, be brief"}
    assert messages[-2]["role"] == "tool"


async def test_the_last_turn_offers_no_tools(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies += [Reply.tool_call("echo", {}), Reply.text("forced answer")]
    settings = LLMSettings(base_url=llm.base_url, model="m", max_turns=2)
    async with make_commander(llm=settings):
        slot = await dispatcher.servicer.next_slot()
        session_id = await slot.start("go", tools=[ECHO_TOOL])
        call = (await slot.recv_kind("tool_call")).tool_call
        await slot.tool_result(session_id, call, result_json="1")
        packets = await slot.recv_until_terminal()
    assert packets[-1].result.result == "forced answer"
    assert "tools" in llm.requests[0] and "tools" not in llm.requests[1]


async def test_model_errors_fail_the_session_with_a_clear_message(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies.append(Reply([], status=500))
    allowed = LLMSettings(
        base_url=llm.base_url, model="test-model", allowed_endpoints=("http://127.0.0.1:9/v1",)
    )
    async with make_commander(llm=allowed):
        slot = await dispatcher.servicer.next_slot()
        await slot.start("hi")
        packets = await slot.recv_until_terminal()
        assert kinds(packets) == ["error", "result"]
        assert packets[0].error.code == "model_error"
        assert "HTTP 500" in packets[0].error.message
        assert packets[1].result.outcome == ipb.SESSION_OUTCOME_FAILURE
        assert len(llm.requests) == 1  # never retried

        # an unreachable endpoint: a connection error, no retry either
        config = agent_pb2.CommonConfig(
            stageModelConfig=agent_pb2.StageModelConfig(
                actionGeneratorModel=agent_pb2.LLMConfig(
                    modelName="x", apiEndpoint="http://127.0.0.1:9/v1", apiKey="sk-secret"
                )
            )
        )
        await slot.start("hi", config=config)
        packets = await slot.recv_until_terminal()
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_FAILURE
        assert "connection failed" in packets[-1].result.message
        assert "sk-secret" not in packets[-1].result.message


async def test_a_server_refusing_optional_extras_gets_a_plainer_request(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies += [Reply([], status=400), Reply([], status=422), Reply.text("plain")]
    async with make_commander():
        slot = await dispatcher.servicer.next_slot()
        await slot.start("hi", tools=[ECHO_TOOL])
        packets = await slot.recv_until_terminal()
    assert packets[-1].result.result == "plain"
    assert "stream_options" in llm.requests[0] and "tools" in llm.requests[0]
    assert "stream_options" not in llm.requests[1] and "tools" in llm.requests[1]
    assert "stream_options" not in llm.requests[2] and "tools" not in llm.requests[2]


async def test_closing_the_planner_at_a_yield_closes_the_model_stream(llm: ScriptedLLM) -> None:
    # The other way a stop reaches the chat planner: not inside the HTTP read,
    # but while it is suspended at a `yield` (the writer is busy), as GeneratorExit.
    llm.replies.append(Reply.text(" ".join(f"w{i}" for i in range(200)), delay=0.01))
    start = ipb.DownstreamPacket(session_id="s1", start=ipb.StartSession(instruction="go"))
    planner = ChatPlanner(LLMSettings(base_url=llm.base_url, model="m"))

    async def send(out: Outgoing[ipb.UpstreamPacket]) -> None:
        raise AssertionError("not used")

    session = Session(start, planner, send, slot_index=0)
    outputs = planner(session.ctx)
    try:
        assert isinstance(outputs, AsyncGenerator)
        for _ in range(3):
            item = await outputs.__anext__()
            assert isinstance(item, ipb.ContentChunk)
        await outputs.aclose()
        with anyio.fail_after(2):
            await llm.streams[0].client_closed.wait()
        assert not llm.streams[0].completed
        usage = session._usage  # recorded for `stopped.final_usage`
        assert usage.output_tokens == 3 and usage.steps == 1 and usage.model == "m"
    finally:
        await planner.aclose()
        session.user_input_receiver.close()
        session._ui_send.close()


async def test_usage_is_priced_from_the_price_table(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    from commander._pricing import ModelPrice, PriceTable

    llm.replies += [
        Reply.text(
            "priced",
            usage={"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500},
        )
    ]
    prices = PriceTable({"m": ModelPrice(2.0, 8.0, "USD")})
    settings = LLMSettings(base_url=llm.base_url, model="m", prices=prices)
    async with make_commander(llm=settings):
        slot = await dispatcher.servicer.next_slot()
        await slot.start("go")
        packets = await slot.recv_until_terminal()
    usage = next(p.usage for p in packets if p.HasField("usage"))
    assert usage.cost == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1e6)
    assert usage.currency == "USD"
    # The built-in table: a local model is free, in a known currency.
    assert LLMSettings().usage("smollm2", 10, 5).currency == "USD"
    assert LLMSettings().usage("smollm2", 10, 5).cost == 0.0


async def test_user_system_prompt_is_appended_to_the_system_prompt(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    llm.replies.append(Reply.text("ok"))
    llm.replies.append(Reply.text("ok"))
    settings = LLMSettings(
        base_url=llm.base_url, allowed_endpoints=(llm.base_url,), system_prompt="Be brief."
    )
    async with make_commander(llm=settings):
        slot = await dispatcher.servicer.next_slot()
        await slot.start("hi", user_system_prompt="Answer in French.")
        packets = await slot.recv_until_terminal()
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
        await slot.start("again")
        packets = await slot.recv_until_terminal()
    assert llm.requests[0]["messages"] == [
        {"role": "system", "content": "Be brief.\n\nAnswer in French."},
        {"role": "user", "content": "hi"},
    ]
    # Only the task that asked for it gets it.
    assert llm.requests[1]["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_a_stream_without_any_chunk_is_a_failure_with_the_servers_reason(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    """llama-cpp-python answers a prompt over its context window with an empty 200
    stream; the planner fails with the reason the server gives for the same request
    not streamed, never an empty success."""
    reason = (
        "This model's maximum context length is 4096 tokens. However, you requested "
        "20031 tokens (20031 in the messages, None in the completion)."
    )
    llm.replies.append(Reply([], empty=True))
    llm.replies.append(
        Reply(
            [],
            status=400,
            body=json.dumps(
                {"error": {"message": reason, "code": "context_length_exceeded"}}
            ).encode(),
        )
    )
    llm.replies.append(Reply([], empty=True))
    llm.replies.append(Reply.text("one token"))  # the probe fits: no reason known
    llm.replies.append(Reply([], finish_reason="length"))
    settings = LLMSettings(base_url=llm.base_url, allowed_endpoints=(llm.base_url,))
    async with make_commander(llm=settings):
        slot = await dispatcher.servicer.next_slot()
        await slot.start("word " * 100)
        first = await slot.recv_until_terminal()
        await slot.start("again")
        second = await slot.recv_until_terminal()
        await slot.start("third")
        third = await slot.recv_until_terminal()
    result = first[-1].result
    assert result.outcome == ipb.SESSION_OUTCOME_FAILURE, first
    assert "maximum context length is 4096 tokens" in result.message, result
    assert not [p for p in first if p.HasField("content")]
    # The probe asked for one token, not streamed.
    assert llm.requests[1]["stream"] is False and llm.requests[1]["max_tokens"] == 1
    assert second[-1].result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "without any chunk" in second[-1].result.message, second[-1]
    assert third[-1].result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "finish_reason=length" in third[-1].result.message, third[-1]


async def test_the_model_that_ran_is_named_not_only_the_requested_one(
    dispatcher: DispatcherServer, llm: ScriptedLLM, make_commander: Callable[..., Commander]
) -> None:
    """A single-model server (llama-cpp-python) answers to any requested name and
    echoes it in its chunks: the usage and the result name the model it lists."""
    llm.models = ["smollm2"]
    llm.replies.append(Reply.text("ok", usage={"prompt_tokens": 3, "completion_tokens": 1}))
    settings = LLMSettings(
        base_url=llm.base_url, allowed_endpoints=(llm.base_url,), model="claude-sonnet-4-20250514"
    )
    async with make_commander(llm=settings):
        slot = await dispatcher.servicer.next_slot()
        await slot.start("hi")
        packets = await slot.recv_until_terminal()
    assert llm.requests[0]["model"] == "claude-sonnet-4-20250514"
    (usage,) = [p.usage for p in packets if p.HasField("usage")]
    assert usage.model == "smollm2", usage
    result = packets[-1].result
    assert result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert result.message.endswith("model smollm2 (requested claude-sonnet-4-20250514)"), result
