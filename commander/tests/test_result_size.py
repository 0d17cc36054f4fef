"""Issue 12, class 5: a tool result over the dispatcher's limit fails its own
call (an error result), never the provider's stream."""

from __future__ import annotations

import json

import anyio
import pytest

from commander import ToolProvider
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tools_pb2
from commander._provider import DEFAULT_MAX_RESULT_BYTES
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer

pytestmark = pytest.mark.anyio

SIX_MIB = 6 * 1024 * 1024


async def test_an_oversized_result_is_an_error_and_the_stream_stays(
    dispatcher: DispatcherServer,
) -> None:
    provider = ToolProvider("size-tools")
    release = anyio.Event()

    @provider.tool()
    async def big() -> str:
        return "x" * SIX_MIB

    @provider.tool()
    async def waits() -> str:
        await release.wait()
        return "small"

    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.run, fast_connection(dispatcher.target))
        fake = await dispatcher.servicer.next_provider()
        # Another call in flight on the same stream (another task's).
        await fake.invoke("other", "waits", {})
        await fake.invoke("big", "big", {})
        answer = await fake.recv()
        assert answer.result.invocation_id == "big"
        assert answer.result.error.code == ipb.TOOL_ERROR_CODE_EXECUTION_FAILED
        # The fake's welcome announces no limit: the default applies.
        assert answer.result.error.message.endswith(
            f"bytes exceeds the limit of {DEFAULT_MAX_RESULT_BYTES} bytes"
        ), answer.result.error.message
        release.set()
        other = await fake.recv()
        assert other.result.invocation_id == "other"
        assert json.loads(other.result.result_json) == "small"
        # Same stream: no reconnect happened.
        assert dispatcher.servicer.providers.empty()
        with anyio.fail_after(5):
            await provider.shutdown()


async def test_a_result_over_the_announced_limit_is_replaced() -> None:
    provider = ToolProvider("size-tools")
    assert provider.max_result_bytes == DEFAULT_MAX_RESULT_BYTES
    provider.max_result_bytes = 100
    ok = tools_pb2.ConnectRequest(
        result=tools_pb2.InvocationResult(invocation_id="i", result_json='"a"')
    )
    assert provider._bounded(ok, "t") is ok
    big = tools_pb2.ConnectRequest(
        result=tools_pb2.InvocationResult(invocation_id="i", result_json='"' + "a" * 200 + '"')
    )
    out = provider._bounded(big, "t")
    assert out.result.invocation_id == "i"
    assert (
        out.result.error.message
        == f"result of {big.ByteSize()} bytes exceeds the limit of 100 bytes"
    )
