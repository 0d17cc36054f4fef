"""Slots reconnect by themselves, with backoff, whenever the dispatcher is away."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest

from commander import Commander, PlannerOutput, PlannerRegistry, SessionContext
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._timeouts import DRAIN_EOF_TIMEOUT
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer, DownAddress, FakeDispatcher, FakeSlot

pytestmark = pytest.mark.anyio

planners = PlannerRegistry()


@planners.register("answer")
async def answer(ctx: SessionContext) -> str:
    return "ok " + ctx.instruction


@planners.register("forever")
async def forever(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    yield "started"
    await anyio.sleep_forever()
    yield "never"


async def test_reconnect_after_the_dispatcher_restarts() -> None:
    server = DispatcherServer()
    await server.start()
    commander = Commander(fast_connection(server.target), slots=2, planners=planners)
    try:
        async with commander:
            first = [await server.servicer.next_slot() for _ in range(2)]
            await commander.wait_connected()
            # a session is running when the dispatcher goes away
            await first[0].start(planner="forever")
            assert (await first[0].recv()).content.text == "started"

            await server.stop()
            await server.start()  # same port, fresh process state

            again = [await server.servicer.next_slot() for _ in range(2)]
            assert sorted(s.hello.slot_index for s in again if s.hello) == [0, 1]
            await again[0].start("after restart", planner="answer")
            packets = await again[0].recv_until_terminal()
            assert packets[-1].result.result == "ok after restart"
    finally:
        await server.stop()


async def test_connects_once_the_dispatcher_comes_up() -> None:
    """While nothing answers, the slot keeps dialling (a fresh dial per attempt) and
    stays disconnected; once the dispatcher is up at that address, it connects."""
    down = DownAddress()
    await down.start()
    server = DispatcherServer()
    server.port = down.port
    commander = Commander(fast_connection(down.target), slots=1, planners=planners)
    try:
        async with commander:
            await down.wait_for_dials(3)
            assert not commander.slots[0].connected
            await down.stop()
            await server.start()
            slot = await server.servicer.next_slot()
            await slot.start("late", planner="answer")
            packets = await slot.recv_until_terminal()
            assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
            assert commander.slots[0].connected
    finally:
        await down.stop()
        await server.stop()


async def test_a_refused_hello_is_retried() -> None:
    server = DispatcherServer()
    server.servicer.ack_hello = False  # never acks: the handshake times out
    await server.start()
    commander = Commander(
        fast_connection(server.target, reconnect_max=0.2, handshake_timeout=0.3),
        slots=1,
        planners=planners,
    )
    try:
        async with commander:
            await server.servicer.next_slot()
            server.servicer.ack_hello = True
            with anyio.fail_after(5):
                await commander.wait_connected()
            assert server.servicer.streams_opened >= 2
    finally:
        await server.stop()


async def test_shutdown_is_prompt_while_the_dispatcher_is_down() -> None:
    """Shutdown does not wait out the reconnect backoff (here at least 5 s)."""
    down = DownAddress()
    await down.start()
    commander = Commander(
        fast_connection(down.target, reconnect_initial=5.0, reconnect_max=10.0),
        slots=2,
        planners=planners,
    )
    try:
        with anyio.fail_after(10):
            async with commander:
                await down.wait_for_dials(2)  # both slots failed once and back off now
                asked = time.monotonic()
        assert time.monotonic() - asked < 1.0
        assert not any(slot.connected for slot in commander.slots)
    finally:
        await down.stop()


async def idle_shutdown(servicer: FakeDispatcher, slots: int) -> tuple[list[FakeSlot], float]:
    """Connects a commander with idle slots, shuts it down; (the slots' streams, seconds)."""
    server = DispatcherServer(servicer)
    await server.start()
    commander = Commander(fast_connection(server.target), slots=slots, planners=planners)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(commander.run)
            streams = [await server.servicer.next_slot() for _ in range(slots)]
            await commander.wait_connected()
            asked = time.monotonic()
            with anyio.fail_after(DRAIN_EOF_TIMEOUT + 5):
                await commander.shutdown()
            took = time.monotonic() - asked
    finally:
        await server.stop()
    return streams, took


async def test_shutdown_half_closes_an_idle_slot_and_leaves_on_the_dispatchers_end() -> None:
    """An idle slot ends its stream cleanly (a half-close, not a cancel) and is gone as
    soon as the dispatcher ends the stream, not after a fixed pause."""
    slots, took = await idle_shutdown(FakeDispatcher(), 2)
    assert all(slot.half_closed.is_set() for slot in slots)
    assert took < DRAIN_EOF_TIMEOUT / 2, took


async def test_shutdown_is_bounded_when_the_dispatcher_never_ends_the_stream() -> None:
    slots, took = await idle_shutdown(FakeDispatcher(end_on_half_close=False), 1)
    assert slots[0].half_closed.is_set()
    # It waited for the end of stream that never came, then cancelled the stream.
    assert DRAIN_EOF_TIMEOUT * 0.9 <= took, took
    with anyio.fail_after(5):
        await slots[0].ended.wait()
