"""The gui planner against the fake dispatcher and the scripted model.

The fake dispatcher plays the broker and a fake sandbox: it answers every
``computer.*`` tool call itself and records the actions.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.lybic.agent import agent_pb2
from commander._pricing import ModelPrice, PriceTable
from commander.gui import parse_model_output
from commander.gui._planner import GuiPlanner, GuiSettings, resolve_models
from commander.tests.fakes import FakeSlot, Reply, ScriptedLLM

pytestmark = pytest.mark.anyio

W, H = 1000, 500
USAGE = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (W, H), (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG = _png()


def uitars(action: str, thought: str = "I act.", **kw: Any) -> Reply:
    return Reply.text(f"Thought: {thought}\nAction: {action}", usage=USAGE, **kw)


@dataclass
class FakeSandbox:
    """Answers the computer.* tools; records what was asked."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    errors: dict[str, tuple[int, str]] = field(default_factory=dict)

    def answer(self, name: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.calls.append((name, args))
        if name in self.errors:
            code, message = self.errors.pop(name)
            return "", {"code": code, "message": message}
        if name == "computer.sandbox_acquire":
            sid = args.get("sandbox_id") or "SBX-new"
            return json.dumps({"sandbox_id": sid, "created": True, "width": W, "height": H}), {}
        if name == "computer.screenshot":
            return json.dumps(
                {"image_base64": PNG, "mime_type": "image/png", "width": W, "height": H}
            ), {}
        return json.dumps({"ok": True, "cursor": {"x": 1, "y": 2}}), {}

    def actions(self) -> list[tuple[str, dict[str, Any]]]:
        skip = ("computer.screenshot", "computer.sandbox_acquire")
        return [
            (n, {k: v for k, v in a.items() if k != "sandbox_id"})
            for n, a in self.calls
            if n not in skip
        ]


async def drive(
    slot: FakeSlot, session_id: str, sandbox: FakeSandbox, *, user_reply: str | None = None
) -> list[ipb.UpstreamPacket]:
    """Plays the dispatcher until the session's terminal packet."""
    packets: list[ipb.UpstreamPacket] = []
    while True:
        packet = await slot.recv(20)
        packets.append(packet)
        kind = packet.WhichOneof("payload")
        if kind == "tool_call":
            call = packet.tool_call
            result, error = sandbox.answer(call.tool_name, json.loads(call.arguments_json))
            await slot.tool_result(session_id, call, result, **error)
        elif kind == "stage" and packet.stage.stage == "call_user" and user_reply is not None:
            await slot.user_input(session_id, user_reply)
        elif kind in ("result", "stopped"):
            return packets


def result_of(packets: list[ipb.UpstreamPacket]) -> ipb.FinalResult:
    assert packets[-1].HasField("result"), packets[-1]
    return packets[-1].result


def usage_of(packets: list[ipb.UpstreamPacket]) -> ipb.Usage:
    total = ipb.Usage()
    for p in packets:
        if p.HasField("usage"):
            u = p.usage
            total.input_tokens += u.input_tokens
            total.output_tokens += u.output_tokens
            total.steps += u.steps
            total.cost += u.cost
            total.currency = u.currency or total.currency
    return total


async def test_actions_map_to_tools_on_the_real_screen_and_finish_is_success(
    make: Any, llm: ScriptedLLM
) -> None:
    llm.replies = [
        uitars("click(point='<point>500 500</point>')"),
        uitars("left_double(start_box='<|box_start|>(100,200)<|box_end|>')"),
        uitars("right_single(point='<point>0 0</point>')"),
        uitars("drag(start_point='<point>100 100</point>', end_point='<point>200 300</point>')"),
        uitars("scroll(point='<point>500 500</point>', direction='up')"),
        uitars("hotkey(key='ctrl c')"),
        uitars("type(content='hi\\n')"),
        uitars("finished(content='all done')"),
    ]
    slot = await make(prices=PriceTable({"ui-tars-test": ModelPrice(1.0, 2.0, "USD")}))
    sid = await slot.start("do things", planner="gui")
    sandbox = FakeSandbox()
    packets = await drive(slot, sid, sandbox)
    result = result_of(packets)
    assert result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert result.result == "all done"
    assert sandbox.actions() == [
        ("computer.click", {"x": 500, "y": 250}),
        ("computer.double_click", {"x": 100, "y": 100}),
        ("computer.right_click", {"x": 0, "y": 0}),
        ("computer.drag", {"start_x": 100, "start_y": 50, "end_x": 200, "end_y": 150}),
        ("computer.scroll", {"x": 500, "y": 250, "down": -5, "right": 0}),
        ("computer.hotkey", {"keys": "ctrl+c"}),
        ("computer.type", {"text": "hi\n", "submit_newlines": True}),
    ]
    usage = usage_of(packets)
    assert (usage.steps, usage.input_tokens, usage.output_tokens) == (8, 800, 80)
    assert usage.cost == pytest.approx((800 * 1.0 + 80 * 2.0) / 1e6)
    assert usage.currency == "USD"
    artifacts = [p.artifact for p in packets if p.HasField("artifact")]
    assert len(artifacts) == 8 and artifacts[0].data[:4] == b"\x89PNG"
    content = [p.content for p in packets if p.HasField("content")]
    assert [c.text for c in content] == ["all done"] and content[0].is_finish
    # The screenshot went to the model as a data URL; only the last 3 are kept.
    last = llm.requests[-1]["messages"]
    urls = [
        part["image_url"]["url"]
        for m in last
        if isinstance(m["content"], list)
        for part in m["content"]
        if part["type"] == "image_url"
    ]
    assert len(urls) == 3 and urls[0].startswith("data:image/png;base64,")


async def test_parse_errors_go_back_to_the_model_and_nothing_runs(
    make: Any, llm: ScriptedLLM
) -> None:
    llm.replies = [
        uitars("type(content=__import__('os').system('touch /tmp/pwned'))"),
        uitars("finished(content='ok')"),
    ]
    slot = await make()
    sid = await slot.start("x", planner="gui")
    sandbox = FakeSandbox()
    packets = await drive(slot, sid, sandbox)
    assert result_of(packets).outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert sandbox.actions() == []
    errors = [p.error for p in packets if p.HasField("error")]
    assert errors and errors[0].code == "parse_error"
    second = llm.requests[1]["messages"][-1]["content"]
    assert "could not be used" in second[0]["text"] and "Nothing was executed" in second[0]["text"]


async def test_out_of_steps_is_failure(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [uitars("click(point='<point>1 1</point>')") for _ in range(3)]
    slot = await make()
    sid = await slot.start("x", planner="gui", config=agent_pb2.CommonConfig(steps=2))
    packets = await drive(slot, sid, FakeSandbox())
    result = result_of(packets)
    assert result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "out of steps" in result.message
    assert len(llm.requests) == 2


async def test_repeated_parse_errors_fail_the_task(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [Reply.text("I will not follow the format") for _ in range(3)]
    slot = await make(max_parse_errors=3)
    sid = await slot.start("x", planner="gui")
    result = result_of(await drive(slot, sid, FakeSandbox()))
    assert result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "could not be parsed 3 times" in result.message


async def test_deadline_is_failure(make: Any, llm: ScriptedLLM) -> None:
    # The first answer streams for longer than the task may run.
    llm.replies = [uitars("click(point='<point>1 1</point>')", delay=0.3)]
    slot = await make()
    sid = await slot.start("x", planner="gui", config=agent_pb2.CommonConfig(taskTimeout=1))
    sandbox = FakeSandbox()
    packets = await drive(slot, sid, sandbox)
    result = result_of(packets)
    assert result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "timed out" in result.message


async def test_call_user_pauses_for_an_interjection(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [uitars("call_user()", thought="I need the password."), uitars("finished()")]
    slot = await make()
    sid = await slot.start("log in", planner="gui")
    packets = await drive(slot, sid, FakeSandbox(), user_reply="it is hunter2")
    assert result_of(packets).outcome == ipb.SESSION_OUTCOME_SUCCESS
    stages = [p.stage for p in packets if p.HasField("stage")]
    assert any(s.stage == "call_user" and "password" in s.message for s in stages)
    told = llm.requests[1]["messages"][-1]["content"][0]["text"]
    assert told == "The user says: it is hunter2"


async def test_a_failed_action_is_told_to_the_model(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [uitars("click(point='<point>1 1</point>')"), uitars("finished()")]
    slot = await make()
    sid = await slot.start("x", planner="gui")
    sandbox = FakeSandbox(errors={"computer.click": (ipb.TOOL_ERROR_CODE_DENIED, "policy says no")})
    packets = await drive(slot, sid, sandbox)
    assert result_of(packets).outcome == ipb.SESSION_OUTCOME_SUCCESS
    told = llm.requests[1]["messages"][-1]["content"][0]["text"]
    assert "computer.click failed (DENIED): policy says no" in told


async def test_model_errors_before_streaming_are_retried(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [
        Reply([], status=503),
        Reply([], status=429),
        uitars("finished(content='fine')"),
    ]
    slot = await make()
    sid = await slot.start("x", planner="gui")
    result = result_of(await drive(slot, sid, FakeSandbox()))
    assert result.outcome == ipb.SESSION_OUTCOME_SUCCESS and result.result == "fine"
    assert len(llm.requests) == 3


async def test_client_errors_are_not_retried(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [Reply([], status=400), uitars("finished()")]
    slot = await make()
    sid = await slot.start("x", planner="gui")
    result = result_of(await drive(slot, sid, FakeSandbox()))
    assert result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "HTTP 400" in result.message
    assert len(llm.requests) == 1


async def test_destroy_sandbox_after_failure(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [uitars("click(point='<point>1 1</point>')")]
    slot = await make()
    sid = await slot.start(
        "x", planner="gui", destroy_sandbox=True, config=agent_pb2.CommonConfig(steps=1)
    )
    sandbox = FakeSandbox()
    packets = await drive(slot, sid, sandbox)
    assert result_of(packets).outcome == ipb.SESSION_OUTCOME_FAILURE
    assert sandbox.calls[-1] == ("computer.sandbox_release", {"sandbox_id": "SBX-new"})


async def test_given_sandbox_is_reused(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [uitars("finished()")]
    slot = await make()
    sid = await slot.start(
        "x", planner="gui", sandbox=agent_pb2.Sandbox(id="SBX-given", shapeName="s")
    )
    sandbox = FakeSandbox()
    await drive(slot, sid, sandbox)
    name, args = sandbox.calls[0]
    assert name == "computer.sandbox_acquire"
    assert args["sandbox_id"] == "SBX-given" and args["shape"] == "s"
    assert all(a.get("sandbox_id") == "SBX-given" for _, a in sandbox.calls)
    assert not any(n == "computer.sandbox_release" for n, _ in sandbox.calls)


async def test_normal_mode_grounding_model_places_the_click(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [
        uitars("click(point='<point>1 1</point>')", thought="Click the OK button."),
        Reply.text("<point>500 500</point>", usage=USAGE),
        uitars("finished()"),
    ]
    slot = await make()
    config = agent_pb2.CommonConfig(
        mode=agent_pb2.NORMAL,
        stageModelConfig=agent_pb2.StageModelConfig(
            groundingModel=agent_pb2.LLMConfig(modelName="grounder", apiEndpoint=llm.base_url)
        ),
    )
    sid = await slot.start("x", planner="gui", config=config)
    sandbox = FakeSandbox()
    packets = await drive(slot, sid, sandbox)
    assert result_of(packets).outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert sandbox.actions() == [("computer.click", {"x": 500, "y": 250})]
    assert llm.requests[1]["model"] == "grounder"
    assert "Click the OK button." in llm.requests[1]["messages"][0]["content"][0]["text"]
    usage = usage_of(packets)
    assert usage.steps == 2 and usage.input_tokens == 300


def test_models_resolve_from_the_stage_config() -> None:
    settings = GuiSettings(base_url="http://default/v1", model="m0", api_key="k0")
    fast = agent_pb2.CommonConfig(
        mode=agent_pb2.FAST,
        stageModelConfig=agent_pb2.StageModelConfig(
            fastActionGeneratorModel=agent_pb2.LLMConfig(modelName="doubao-ui-tars", apiKey="k1"),
            actionGeneratorModel=agent_pb2.LLMConfig(modelName="other"),
            groundingModel=agent_pb2.LLMConfig(modelName="g"),
        ),
    )
    action, grounding, is_fast = resolve_models(fast, settings)
    assert is_fast and grounding is None
    assert action.model == "doubao-ui-tars" and action.api_key == "k1"
    assert action.base_url.startswith("https://ark.")
    normal = agent_pb2.CommonConfig()
    normal.CopyFrom(fast)
    normal.mode = agent_pb2.NORMAL
    action, grounding, is_fast = resolve_models(normal, settings)
    assert not is_fast and action.model == "other" and grounding is not None
    assert grounding.model == "g" and action.base_url == "http://default/v1"
    action, grounding, _ = resolve_models(agent_pb2.CommonConfig(), settings)
    assert (action.model, action.api_key, grounding) == ("m0", "k0", None)


DESCRIPTION = 'Screen: 1000x500 pixels.\nVisible windows:\n- "xterm" at x=0 y=0, 484x316 pixels'


@dataclass
class DescribingSandbox(FakeSandbox):
    """A FakeSandbox that also answers computer.describe_screen."""

    def answer(self, name: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if name == "computer.describe_screen":
            self.calls.append((name, args))
            return json.dumps({"width": W, "height": H, "windows": [], "text": DESCRIPTION}), {}
        return super().answer(name, args)


def jsonaction(action: str, x: int = 0, y: int = 0, text: str = "") -> Reply:
    body = {"thought": "I act.", "action": action, "x": x, "y": y, "text": text}
    return Reply.text(json.dumps(body), usage=USAGE)


async def test_text_observation_for_a_text_only_model_with_constrained_json(
    make: Any, llm: ScriptedLLM
) -> None:
    llm.replies = [
        jsonaction("click", 100, 50),
        jsonaction("type", text="hello\n"),
        jsonaction("finished", text="typed hello"),
    ]
    slot = await make(model="smollm2")  # auto: a known text-only model
    sid = await slot.start("type hello", planner="gui")
    sandbox = DescribingSandbox()
    packets = await drive(slot, sid, sandbox)
    result = result_of(packets)
    assert result.outcome == ipb.SESSION_OUTCOME_SUCCESS and result.result == "typed hello"
    assert [a for a in sandbox.actions() if a[0] != "computer.describe_screen"] == [
        ("computer.click", {"x": 100, "y": 50}),  # screen pixels, unscaled
        ("computer.type", {"text": "hello\n", "submit_newlines": True}),
    ]
    assert [n for n, _ in sandbox.calls].count("computer.describe_screen") == 3
    first, last = llm.requests[0], llm.requests[-1]
    # Grammar-constrained decoding: llama-cpp-python's json_object + schema.
    assert first["response_format"]["type"] == "json_object"
    assert first["response_format"]["schema"]["properties"]["action"]["enum"][0] == "type"
    # No image anywhere, only text: the prompt, then the description of each step.
    for message in last["messages"]:
        assert isinstance(message["content"], str)
    assert '"action"' in last["messages"][0]["content"]
    assert last["messages"][1]["content"] == "Step 1. " + DESCRIPTION
    assert "Done: you typed 'hello\\n'. If the task is complete" in last["messages"][-1]["content"]
    assert "Step 3. " + DESCRIPTION in last["messages"][-1]["content"]
    # Screenshots still go to the task's events (what the user sees).
    assert len([p for p in packets if p.HasField("artifact")]) == 3


async def test_text_observation_never_finished_ends_as_failure_at_the_step_limit(
    make: Any, llm: ScriptedLLM
) -> None:
    llm.replies = [jsonaction("wait") for _ in range(4)]
    slot = await make(model="m", observation="text", steps=4, history_descriptions=2)
    sid = await slot.start("x", planner="gui")
    packets = await drive(slot, sid, DescribingSandbox())
    result = result_of(packets)
    assert result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "out of steps" in result.message and "4 steps" in result.message
    contents = [m["content"] for m in llm.requests[-1]["messages"] if m["role"] == "user"]
    # Older descriptions leave the conversation; the last two stay.
    assert sum(DESCRIPTION in c for c in contents) == 2


async def test_screenshot_models_keep_ui_tars_and_send_no_response_format(
    make: Any, llm: ScriptedLLM
) -> None:
    llm.replies = [uitars("finished(content='ok')")]
    slot = await make()
    sid = await slot.start("x", planner="gui")
    sandbox = DescribingSandbox()
    packets = await drive(slot, sid, sandbox)
    assert result_of(packets).outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert "response_format" not in llm.requests[0]
    assert "computer.describe_screen" not in [n for n, _ in sandbox.calls]


async def test_both_observations_send_the_description_beside_the_image(
    make: Any, llm: ScriptedLLM
) -> None:
    llm.replies = [uitars("finished(content='ok')")]
    slot = await make(observation="both")
    sid = await slot.start("x", planner="gui")
    packets = await drive(slot, sid, DescribingSandbox())
    assert result_of(packets).outcome == ipb.SESSION_OUTCOME_SUCCESS
    parts = llm.requests[0]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"]
    assert parts[0]["text"] == "Step 1. " + DESCRIPTION


def test_resolve_io_picks_text_and_json_for_text_only_models() -> None:
    from commander.gui._planner import resolve_io

    assert resolve_io(GuiSettings(), "SmolLM2-135M-Instruct") == ("text", "json")
    assert resolve_io(GuiSettings(), "ui-tars-1.5") == ("screenshot", "ui-tars")
    assert resolve_io(GuiSettings(observation="text"), "gpt-4o") == ("text", "json")
    assert resolve_io(GuiSettings(output_format="pyautogui"), "x") == ("screenshot", "pyautogui")
    assert resolve_io(GuiSettings(observation="both", output_format="json"), "x") == (
        "both",
        "json",
    )


async def test_the_sandbox_in_use_is_reported_and_kept_unless_destroyed(
    make: Any, llm: ScriptedLLM
) -> None:
    llm.replies = [uitars("finished(content='ok')")]
    slot = await make()
    sid = await slot.start("x", planner="gui")
    packets = await drive(slot, sid, FakeSandbox())
    reported = [p.sandbox for p in packets if p.HasField("sandbox")]
    assert len(reported) == 1
    assert reported[0].sandbox.id == "SBX-new" and reported[0].kept is True


async def test_the_model_output_is_parsed_off_the_event_loop(
    make: Any, llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 12: parsing is CPU work; on the event loop it stalled every session.
    import asyncio

    from commander.gui import _planner

    on_the_loop: list[bool] = []
    real = parse_model_output

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_the_loop.append(True)
        except RuntimeError:
            on_the_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(_planner, "parse_model_output", spy)
    llm.replies = [uitars("finished(content='ok')")]
    slot = await make()
    sid = await slot.start("x", planner="gui")
    assert result_of(await drive(slot, sid, FakeSandbox())).outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert on_the_loop == [False]


async def test_parses_run_at_most_parse_concurrency_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import anyio
    import anyio.from_thread

    from commander.gui import Relative1000, ScreenSize, _planner

    limit = _planner.PARSE_CONCURRENCY
    release = threading.Event()
    lock = threading.Lock()
    inside = [0, 0]  # now, most at once
    full = anyio.Event()
    real = parse_model_output

    def blocked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
            if inside[0] == limit:
                anyio.from_thread.run_sync(full.set)
        release.wait(10)
        with lock:
            inside[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(_planner, "parse_model_output", blocked)
    planner = GuiPlanner(GuiSettings())
    results: list[Any] = []

    async def parse() -> None:
        results.append(
            await planner.parse(
                "Action: wait()",
                output_format="ui-tars",
                screen=ScreenSize(100, 100),
                space=Relative1000(),
            )
        )

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(limit + 3):
                tg.start_soon(parse)
            with anyio.fail_after(10):
                await full.wait()
            assert planner._parse_limiter is not None
            assert planner._parse_limiter.statistics().tasks_waiting == 3
            release.set()
    finally:
        release.set()
        await planner.aclose()
    assert len(results) == limit + 3
    assert inside[1] == limit


async def test_user_system_prompt_is_the_system_message(make: Any, llm: ScriptedLLM) -> None:
    llm.replies = [uitars("finished(content='ok')")]
    slot = await make()
    sid = await slot.start("do it", planner="gui", user_system_prompt="Never close windows.")
    result = result_of(await drive(slot, sid, FakeSandbox()))
    assert result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    messages = llm.requests[0]["messages"]
    assert messages[0] == {"role": "system", "content": "Never close windows."}
    assert messages[1]["role"] == "user" and "do it" in str(messages[1]["content"])


async def test_a_stream_without_any_chunk_fails_with_the_servers_reason(
    make: Any, llm: ScriptedLLM
) -> None:
    """Not an empty reply to parse (and retry): the server took nothing; the
    task fails with the reason the same request gets when not streamed."""
    reason = "This model's maximum context length is 4096 tokens. However, you requested 9000."
    llm.replies = [
        Reply([], empty=True),
        Reply([], status=400, body=json.dumps({"error": {"message": reason}}).encode()),
    ]
    slot = await make()
    sid = await slot.start("do it", planner="gui")
    result = result_of(await drive(slot, sid, FakeSandbox()))
    assert result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "maximum context length is 4096 tokens" in result.message, result
    assert len(llm.requests) == 2 and llm.requests[1]["stream"] is False
