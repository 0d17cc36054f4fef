"""Every text the commander sends is valid UTF-8, whatever it was cut or built from
(issue 12, class 1): protobuf cannot carry anything else, and building a message
from such a ``str`` raises on the spot."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from commander import (
    Commander,
    PlannerOutput,
    PlannerRegistry,
    SessionContext,
    ToolExecutionError,
    ToolProvider,
)
from commander._errors import CommanderError
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._pricing import parse_prices
from commander._text import MARK, clip, decode_prefix, valid_text
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer

pytestmark = pytest.mark.anyio

#: 900 bytes of Chinese, as a file name or an API's error message would be.
CHINESE = "找不到文件 " + "中文文件名" * 59
#: A lone surrogate, as a JSON "\ud83d" escape or a surrogate-escaped file name gives.
LONE = "half an emoji \ud83d and a file name byte \udcff"


def test_valid_text() -> None:
    assert valid_text(CHINESE) is CHINESE
    assert valid_text(LONE) == "half an emoji \ufffd and a file name byte \ufffd"
    assert valid_text("a pair \ud83d\ude00 joins") == "a pair \U0001f600 joins"
    ipb.ContentChunk(text=valid_text(LONE))  # a message can be built from it


def test_clip_cuts_on_a_character_boundary() -> None:
    for n in range(0, 40):
        got = clip("x" + CHINESE, n)
        assert len(got.encode("utf-8")) <= max(n, len(MARK.encode())), (n, got)
        assert ("x" + CHINESE).startswith(got.removesuffix(MARK))
    assert clip("short", 100) == "short"
    assert clip(LONE, 1000) == valid_text(LONE)


def test_decode_prefix_drops_a_cut_character() -> None:
    data = "ab文".encode()
    assert decode_prefix(data[:4], cut=True) == "ab"
    assert decode_prefix(data[:4], cut=False) == "ab\ufffd"
    assert decode_prefix(data, cut=True) == "ab文"
    assert decode_prefix(b"a\xffb", cut=False) == "a\ufffdb"


async def test_tool_errors_from_bytes_and_surrogates_become_results(
    dispatcher: DispatcherServer,
) -> None:
    """A tool error built from a surrogate-escaped file name, an API's error body
    or any exception text is answered as an error result, and the provider goes on:
    building the result used to raise and end the provider's stream."""
    provider = ToolProvider("texts")

    @provider.tool()
    async def chinese() -> None:
        raise ToolExecutionError(CHINESE)

    @provider.tool()
    async def lone() -> None:
        raise ToolExecutionError(LONE)

    @provider.tool()
    def listing() -> None:
        # A file name that is not UTF-8, as os.listdir gives it (os.fsdecode).
        name = os.fsdecode(b"r\xe9sum\xe9.txt")
        raise RuntimeError(f"cannot read {name}")

    @provider.tool()
    async def buggy() -> None:
        raise ValueError(LONE)

    @provider.tool()
    async def ok() -> str:
        return "fine"

    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.run, fast_connection(dispatcher.target))
        fake = await dispatcher.servicer.next_provider()
        for name in ("chinese", "lone", "listing", "buggy"):
            await fake.invoke(name, name, {})
            answer = (await fake.recv()).result
            assert answer.invocation_id == name
            assert answer.error.code == ipb.TOOL_ERROR_CODE_EXECUTION_FAILED, answer
            message = answer.error.message
            assert message.encode("utf-8")  # valid: a str from the wire
            if name == "chinese":
                assert message == CHINESE  # the provider does not cut it
            else:
                assert "\ufffd" in message, message
            await fake.invoke("ok-" + name, "ok", {})
            assert json.loads((await fake.recv()).result.result_json) == "fine"
        with anyio.fail_after(5):
            await provider.shutdown()


planners = PlannerRegistry()


@planners.register("lone_content")
async def lone_content(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    yield LONE


@planners.register("lone_failure")
async def lone_failure(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    yield "about to fail"
    raise OSError(f"cannot open {LONE}")


@planners.register("lone_answer")
async def lone_answer(ctx: SessionContext) -> str:
    await anyio.lowlevel.checkpoint()
    return LONE


async def test_planner_text_that_utf8_cannot_carry_is_sent_repaired(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    """A planner's text, exception or answer holding surrogates reaches the
    dispatcher with U+FFFD in their place; the session ends as it should."""
    async with make_commander(planners=planners):
        slot = await dispatcher.servicer.next_slot()
        await slot.start(planner="lone_content")
        packets = await slot.recv_until_terminal()
        assert packets[0].content.text == valid_text(LONE)
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS

        await slot.start(planner="lone_failure")
        packets = await slot.recv_until_terminal()
        assert packets[-2].error.message == f"OSError: cannot open {valid_text(LONE)}"
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_FAILURE

        await slot.start(planner="lone_answer")
        packets = await slot.recv_until_terminal()
        assert packets[-1].result.result == valid_text(LONE)
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS


@pytest.mark.parametrize("price", ["inf", "nan", "-inf"])
def test_price_table_refuses_non_finite_prices(tmp_path: Path, price: str) -> None:
    """A price of inf or nan makes every cost of the model inf or nan, a usage the
    dispatcher refuses (and a max_cost could not be enforced)."""
    path = tmp_path / "prices.toml"
    path.write_text(f'[models."m"]\ninput = {price}\noutput = 1.0\n')
    with pytest.raises(CommanderError, match="non-finite"):
        parse_prices(path)
