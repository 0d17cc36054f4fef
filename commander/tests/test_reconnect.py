"""Slots reconnect by themselves, with backoff, whenever the dispatcher is away."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import anyio
import pytest

from commander import Commander, PlannerOutput, PlannerRegistry, SessionContext
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
    server = DispatcherServer()
    server.port = free_port()
    commander = Commander(fast_connection(server.target), slots=1, planners=planners)
    try:
        async with commander:
            await anyio.sleep(0.5)  # several failed attempts with backoff
            assert not commander.slots[0].connected
            await server.start()
            slot = await server.servicer.next_slot()
            await slot.start("late", planner="answer")
            packets = await slot.recv_until_terminal()
            assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    finally:
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
    commander = Commander(fast_connection(f"127.0.0.1:{free_port()}"), slots=2, planners=planners)
    with anyio.fail_after(3):
        async with commander:
            await anyio.sleep(0.3)
