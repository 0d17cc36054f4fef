"""The ToolProvider runtime against the fake dispatcher's ToolProviderService."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable

import anyio
import pytest
from google.protobuf import timestamp_pb2

from commander import ToolExecutionError, ToolProvider
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer, FakeProvider

pytestmark = pytest.mark.anyio


class Probe:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cancelled = anyio.Event()


def build(probe: Probe) -> ToolProvider:
    provider = ToolProvider("test-tools", labels={"team": "qa"})

    @provider.tool(description="Add two integers.")
    async def add(a: int, b: int = 0) -> int:
        return a + b

    @provider.tool("text.upper", side_effects=False, timeout_ms=500)
    def upper(text: str) -> dict[str, str]:
        """Upper-case a text.

        Runs in a worker thread (a plain function)."""
        return {"text": text.upper()}

    @provider.tool
    async def slow(seconds: float) -> str:
        probe.started.set()
        try:
            await anyio.sleep(seconds)
        except BaseException:
            probe.cancelled.set()
            raise
        return "slept"

    @provider.tool()
    async def broken() -> None:
        raise ToolExecutionError("disk on fire")

    @provider.tool()
    async def buggy() -> None:
        raise KeyError("oops")

    return provider


Served = tuple[FakeProvider, Probe, ToolProvider]


async def serve(dispatcher: DispatcherServer, body: Callable[[Served], Awaitable[None]]) -> None:
    """Run ``body`` while a provider is connected to the fake dispatcher.

    A callback rather than a fixture: no task group is held open across a yield.
    """
    probe = Probe()
    provider = build(probe)
    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.run, fast_connection(dispatcher.target))
        fake = await dispatcher.servicer.next_provider()
        await body((fake, probe, provider))
        with anyio.fail_after(5):
            await provider.shutdown()


async def test_hello_declares_tools_with_json_schemas(
    dispatcher: DispatcherServer,
) -> None:
    async def body(served: Served) -> None:
        fake, _, provider = served
        assert fake.hello is not None
        assert fake.hello.provider_id == "test-tools"
        assert dict(fake.hello.labels) == {"team": "qa"}
        specs = {t.name: t for t in fake.hello.tools}
        assert set(specs) == {"add", "text.upper", "slow", "broken", "buggy"}
        assert specs["add"].description == "Add two integers."
        assert json.loads(specs["add"].parameters_json_schema) == {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a"],
            "additionalProperties": False,
        }
        assert specs["text.upper"].description == "Upper-case a text."
        assert specs["text.upper"].timeout_ms == 500
        with anyio.fail_after(2):
            await provider.registered.wait()

    await serve(dispatcher, body)


async def test_invocations_are_served_and_answered_by_id(
    dispatcher: DispatcherServer,
) -> None:
    async def body(served: Served) -> None:
        fake, _, _ = served
        await fake.invoke("i1", "add", {"a": 2, "b": 3})
        await fake.invoke("i2", "text.upper", {"text": "abc"})
        answers = {}
        for _ in range(2):
            message = await fake.recv()
            answers[message.result.invocation_id] = message.result
        assert json.loads(answers["i1"].result_json) == 5
        assert json.loads(answers["i2"].result_json) == {"text": "ABC"}
        assert not answers["i1"].HasField("error")

    await serve(dispatcher, body)


@pytest.mark.parametrize(
    ("tool", "arguments", "code", "text"),
    [
        ("nope", {}, ipb.TOOL_ERROR_CODE_UNKNOWN_TOOL, "no tool named"),
        ("add", "not json", ipb.TOOL_ERROR_CODE_INVALID_ARGUMENTS, "not JSON"),
        ("add", "[1, 2]", ipb.TOOL_ERROR_CODE_INVALID_ARGUMENTS, "JSON object"),
        ("add", {"c": 1}, ipb.TOOL_ERROR_CODE_INVALID_ARGUMENTS, "argument"),
        ("broken", {}, ipb.TOOL_ERROR_CODE_EXECUTION_FAILED, "disk on fire"),
        ("buggy", {}, ipb.TOOL_ERROR_CODE_EXECUTION_FAILED, "KeyError"),
    ],
)
async def test_failures_become_error_results(
    dispatcher: DispatcherServer,
    tool: str,
    arguments: object,
    code: int,
    text: str,
) -> None:
    async def body(served: Served) -> None:
        fake, _, _ = served
        await fake.invoke("bad", tool, arguments)
        answer = await fake.recv()
        assert answer.result.invocation_id == "bad"
        assert answer.result.error.code == code
        assert text in answer.result.error.message
        # the provider goes on serving
        await fake.invoke("ok", "add", {"a": 1})
        assert json.loads((await fake.recv()).result.result_json) == 1

    await serve(dispatcher, body)


async def test_cancel_stops_the_invocation_and_sends_no_result(
    dispatcher: DispatcherServer,
) -> None:
    async def body(served: Served) -> None:
        fake, probe, _ = served
        await fake.invoke("long", "slow", {"seconds": 30})
        with anyio.fail_after(2):
            await probe.started.wait()
        await fake.cancel("long")
        with anyio.fail_after(2):
            await probe.cancelled.wait()
        await fake.invoke("after", "add", {"a": 4})
        answer = await fake.recv()
        assert answer.result.invocation_id == "after"  # nothing came for "long"

    await serve(dispatcher, body)


async def test_the_deadline_times_an_invocation_out(
    dispatcher: DispatcherServer,
) -> None:
    async def body(served: Served) -> None:
        fake, probe, _ = served
        deadline = timestamp_pb2.Timestamp()
        deadline.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=200))
        await fake.invoke("late", "slow", {"seconds": 30}, deadline=deadline)
        answer = await fake.recv()
        assert answer.result.invocation_id == "late"
        assert answer.result.error.code == ipb.TOOL_ERROR_CODE_TIMEOUT
        assert probe.cancelled.is_set()

    await serve(dispatcher, body)


async def test_provider_reconnects_after_the_dispatcher_restarts() -> None:
    server = DispatcherServer()
    await server.start()
    provider = build(Probe())
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(provider.run, fast_connection(server.target))
            await server.servicer.next_provider()
            await server.stop()
            await server.start()
            fake = await server.servicer.next_provider()
            await fake.invoke("again", "add", {"a": 7})
            assert json.loads((await fake.recv()).result.result_json) == 7
            await provider.shutdown()
    finally:
        await server.stop()


async def test_local_call_and_registration_rules() -> None:
    provider = build(Probe())
    assert await provider.call("add", {"a": 1, "b": 2}) == 3
    with pytest.raises(ValueError, match="already registered"):
        provider.add_tool(lambda: None, name="add")

    def variadic(*args: int) -> None: ...

    with pytest.raises(ValueError, match="passable by name"):
        provider.add_tool(variadic)
