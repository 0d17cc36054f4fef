"""Issue 12, class 5: no packet the commander writes is over the message limit.
A huge content chunk is split, a huge result is refused for its session only;
the slot's stream goes on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from commander import Commander, PlannerOutput, PlannerRegistry, SessionContext
from commander._connection import MAX_MESSAGE_BYTES
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._session import split_text
from commander.tests.fakes import DispatcherServer

pytestmark = pytest.mark.anyio

# 5 MiB of text, mostly 3-byte characters, so a cut could split one.
HUGE = ("答" * 1000 + "x") * (5 * 1024 * 1024 // 3001)

planners = PlannerRegistry()


@planners.register("huge")
async def huge(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    yield ipb.ContentChunk(text=HUGE, is_finish=True)


@planners.register("huge_result")
async def huge_result(ctx: SessionContext) -> str:
    return "y" * (5 * 1024 * 1024)


@planners.register("answer")
async def answer(ctx: SessionContext) -> str:
    return "small"


async def test_a_5_mib_content_chunk_is_split_and_the_slot_goes_on(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    async with make_commander(planners=planners):
        slot = await dispatcher.servicer.next_slot()
        await slot.start(planner="huge")
        packets = await slot.recv_until_terminal()
        assert all(p.ByteSize() <= MAX_MESSAGE_BYTES for p in packets)
        content = [p.content for p in packets if p.WhichOneof("payload") == "content"]
        assert len(content) >= 2, [p.WhichOneof("payload") for p in packets]
        assert "".join(c.text for c in content) == HUGE
        assert [c.is_finish for c in content] == [False] * (len(content) - 1) + [True]
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
        # The same stream serves the next session.
        await slot.start(planner="answer")
        packets = await slot.recv_until_terminal()
        assert packets[-1].result.result == "small"


async def test_a_5_mib_result_fails_its_session_only(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    async with make_commander(planners=planners):
        slot = await dispatcher.servicer.next_slot()
        await slot.start(planner="huge_result")
        packets = await slot.recv_until_terminal()
        assert all(p.ByteSize() <= MAX_MESSAGE_BYTES for p in packets)
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_FAILURE
        assert "exceeds the 4190208-byte message limit" in packets[-1].result.message
        await slot.start(planner="answer")
        packets = await slot.recv_until_terminal()
        assert packets[-1].result.result == "small"


def test_split_text_keeps_characters_whole() -> None:
    text = "a" + "答" * 10
    pieces = split_text(text, 4)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 4 for p in pieces)
    assert split_text("short", 100) == ["short"]
