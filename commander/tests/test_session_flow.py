"""The ChatStream life cycle against the in-process fake dispatcher."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable

import anyio
import anyio.lowlevel
import pytest

from commander import (
    Commander,
    PlannerOutput,
    PlannerRegistry,
    SessionContext,
)
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer, FakeSlot, after_terminal, everything_sent

pytestmark = pytest.mark.anyio


def kinds(packets: list[ipb.UpstreamPacket]) -> list[str]:
    return [p.WhichOneof("payload") or "" for p in packets]


planners = PlannerRegistry()


@planners.register("echo")
async def echo(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    yield ipb.StageChange(stage="echoing", message="")
    yield ipb.ThoughtChain(step_name="Planning", delta="repeat it")
    for word in ctx.instruction.split():
        yield word + " "
    yield ipb.ContentChunk(text="", is_finish=True)
    yield ipb.Usage(input_tokens=1, output_tokens=2, steps=1, model="echo")


@planners.register("boom")
async def boom(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    yield "about to fail"
    raise ValueError("the planner broke")


@planners.register("answer")
async def answer(ctx: SessionContext) -> str:
    await anyio.lowlevel.checkpoint()
    return f"answer to {ctx.instruction}"


@planners.register("final")
async def final(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    yield "working"
    ctx.add_usage(output_tokens=7, model="m")
    yield ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_FAILURE, result="", message="gave up")
    yield "never sent"


@planners.register("listen")
async def listen(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    yield "waiting for you"
    message = await ctx.user_inputs.receive()
    yield f"you said: {message.text}"


async def test_hello_start_result_and_the_next_start(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    commander = make_commander(planners=planners, labels={"region": "test"}, commander_id="c-1")
    async with commander:
        slot = await dispatcher.servicer.next_slot()
        assert slot.hello is not None
        assert slot.hello.commander_id == "c-1"
        assert slot.hello.version
        assert slot.hello.slot_index == 0
        assert dict(slot.hello.labels) == {"region": "test"}
        assert set(slot.hello.capabilities) == {
            "planner:answer",
            "planner:boom",
            "planner:echo",
            "planner:final",
            "planner:listen",
        }
        await commander.wait_connected()

        before = time.time_ns() // 1000
        session_id = await slot.start("one two three", planner="echo")
        packets = await slot.recv_until_terminal()
        # Consecutive content chunks may go out as one packet when they wait
        # for the writer together (coalescing): compare the runs.
        assert [k for k, _ in itertools.groupby(kinds(packets))] == [
            "stage",
            "thought",
            "content",
            "usage",
            "result",
        ]
        text = "".join(p.content.text for p in packets if p.HasField("content"))
        assert text == "one two three "
        assert all(p.session_id == session_id for p in packets)
        stamps = [p.timestamp for p in packets]
        assert stamps == sorted(stamps) and stamps[0] >= before
        result = packets[-1].result
        assert result.outcome == ipb.SESSION_OUTCOME_SUCCESS
        assert result.result == "one two three "  # the content, by default

        # SESSION_CLOSED was acked by the fake; the slot takes the next start.
        second = await slot.start("again", planner="answer")
        packets = await slot.recv_until_terminal()
        assert kinds(packets) == ["result"]
        assert packets[0].session_id == second
        assert packets[0].result.result == "answer to again"


async def test_several_slots_each_say_hello(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    async with make_commander(planners=planners, slots=3):
        slots = [await dispatcher.servicer.next_slot() for _ in range(3)]
        indexes = sorted(s.hello.slot_index for s in slots if s.hello is not None)
        assert indexes == [0, 1, 2]
        # Sessions on different slots run independently.
        ids = [await s.start("x y", planner="echo") for s in slots]
        for slot, sid in zip(slots, ids, strict=True):
            packets = await slot.recv_until_terminal()
            assert packets[-1].session_id == sid
            assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS


async def test_planner_exception_becomes_error_and_failure(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    async with make_commander(planners=planners):
        slot = await dispatcher.servicer.next_slot()
        await slot.start(planner="boom")
        packets = await slot.recv_until_terminal()
        assert kinds(packets) == ["content", "error", "result"]
        assert packets[1].error.code == "planner_error"
        assert packets[1].error.message == "ValueError: the planner broke"
        assert packets[2].result.outcome == ipb.SESSION_OUTCOME_FAILURE
        assert packets[2].result.message == "ValueError: the planner broke"


async def test_unknown_planner_fails_the_session_only(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    async with make_commander(planners=planners):
        slot = await dispatcher.servicer.next_slot()
        await slot.start(planner="nope")
        packets = await slot.recv_until_terminal()
        assert kinds(packets) == ["error", "result"]
        assert packets[0].error.code == "unknown_planner"
        assert packets[1].result.outcome == ipb.SESSION_OUTCOME_FAILURE
        await slot.start("still alive", planner="answer")
        packets = await slot.recv_until_terminal()
        assert packets[-1].result.result == "answer to still alive"


async def test_final_result_ends_the_planner_and_pending_usage_is_flushed(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    async with make_commander(planners=planners):
        slot = await dispatcher.servicer.next_slot()
        session_id = await slot.start(planner="final")
        packets = await slot.recv_until_terminal()
        assert kinds(packets) == ["content", "usage", "result"]
        assert packets[1].usage.output_tokens == 7
        assert packets[2].result.outcome == ipb.SESSION_OUTCOME_FAILURE
        assert packets[2].result.message == "gave up"
    assert after_terminal(await everything_sent(slot), session_id) == []


async def test_user_input_reaches_the_planner(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    async with make_commander(planners=planners):
        slot = await dispatcher.servicer.next_slot()
        session_id = await slot.start(planner="listen")
        first = await slot.recv()
        assert first.content.text == "waiting for you"
        await slot.user_input(session_id, "make it blue")
        packets = await slot.recv_until_terminal()
        assert packets[0].content.text == "you said: make it blue"
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
        assert packets[-1].session_id == session_id


async def test_token_is_sent_as_bearer_metadata(dispatcher: DispatcherServer) -> None:
    commander = Commander(
        fast_connection(dispatcher.target, token="s3cret"), slots=1, planners=planners
    )
    async with commander:
        slot = await dispatcher.servicer.next_slot()
        assert slot.metadata.get("authorization") == "Bearer s3cret"
    assert "s3cret" not in repr(commander.connection)


async def test_shutdown_lets_a_session_finish_within_the_grace(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    slow = PlannerRegistry()

    @slow.register("slow")
    async def slow_planner(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
        yield "start"
        await anyio.sleep(0.3)
        yield "done"

    commander = make_commander(planners=slow, shutdown_grace=5.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(commander.run)
        slot = await dispatcher.servicer.next_slot()
        await slot.start(planner="slow")
        assert (await slot.recv()).content.text == "start"
        with anyio.fail_after(5):
            await commander.shutdown()
    received = [p for p in slot.received if p.WhichOneof("payload") != "hello"]
    assert kinds(received) == ["content", "content", "result"]
    assert received[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    await _wait_ended(slot)


async def test_shutdown_stops_a_session_that_outlives_the_grace(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    endless = PlannerRegistry()
    cancelled = anyio.Event()

    @endless.register("endless")
    async def endless_planner(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
        yield "forever"
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        yield "unreachable"

    commander = make_commander(planners=endless, shutdown_grace=0.2)
    async with commander:
        slot = await dispatcher.servicer.next_slot()
        await slot.start(planner="endless")
        assert (await slot.recv()).content.text == "forever"
    assert cancelled.is_set()
    terminal = slot.received[-1]
    assert terminal.WhichOneof("payload") == "result"
    assert terminal.result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "shut down" in terminal.result.message


async def test_a_start_on_a_busy_slot_is_refused(
    dispatcher: DispatcherServer, make_commander: Callable[..., Commander]
) -> None:
    async with make_commander(planners=planners):
        slot = await dispatcher.servicer.next_slot()
        first = await slot.start(planner="listen")
        assert (await slot.recv()).session_id == first
        second = await slot.start(planner="echo")
        refusal = await slot.recv()
        assert refusal.session_id == second
        assert refusal.result.outcome == ipb.SESSION_OUTCOME_FAILURE
        await slot.user_input(first, "ok")
        packets = await slot.recv_until_terminal()
        assert packets[-1].session_id == first


async def _wait_ended(slot: FakeSlot) -> None:
    with anyio.fail_after(5):
        await slot.ended.wait()
