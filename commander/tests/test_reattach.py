"""A session re-attaching after its stream was lost: what the slot does with each answer.

A refusal the dispatcher could not decide (its store or the fleet's database
did not answer, it was shutting down) ends the stream UNAVAILABLE before any
ack: the slot tries again until its hand-over window runs out, waiting longer
after each such refusal (``reconnect_initial`` doubling to 8 times it). A
final refusal (the hello's ack without the session id) gives the session up
at once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator

import anyio
import grpc
import pytest

from commander import Commander, PlannerOutput, PlannerRegistry, SessionContext
from commander._connection import ConnectFailed, ConnectionConfig, reconnect_forever
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer

pytestmark = pytest.mark.anyio

planners = PlannerRegistry()

#: What the ``gated`` planner waits for, and what it says happened to it.
gate: dict[str, anyio.Event] = {}


@planners.register("gated")
async def gated(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    try:
        yield "started"
        await gate["go"].wait()
        yield " done"
    except BaseException:
        gate["cancelled"].set()
        raise


LATER = (
    grpc.StatusCode.UNAVAILABLE,
    "re-attach refused for now; reconnect and re-attach again "
    "(task store unavailable: writes are failing (retrying))",
)


def _taken(reattach: ipb.Reattach, recorded: int) -> ipb.DownstreamPacket:
    return ipb.DownstreamPacket(
        session_id=reattach.session_id,
        ack=ipb.Ack(kind=ipb.ACK_KIND_HELLO, slot_id="slot-y", upstream_seq=recorded, attempt=2),
    )


async def _running_session(server: DispatcherServer) -> str:
    """Start a ``gated`` session on the commander's slot; its first packet is recorded."""
    gate["go"], gate["cancelled"] = anyio.Event(), anyio.Event()
    slot = await server.servicer.next_slot()
    session_id = await slot.start("x", planner="gated")
    packet = await slot.recv_kind("content")
    assert (packet.content.text, packet.seq) == ("started", 1)
    return session_id


async def test_a_reattach_refused_for_now_is_tried_again_until_it_is_taken() -> None:
    server = DispatcherServer()
    await server.start()
    commander = Commander(
        fast_connection(server.target), slots=1, planners=planners, handover_timeout=30.0
    )
    try:
        async with commander:
            session_id = await _running_session(server)
            refusals = 2

            def answer(
                reattach: ipb.Reattach,
            ) -> ipb.DownstreamPacket | tuple[grpc.StatusCode, str]:
                nonlocal refusals
                if refusals > 0:
                    refusals -= 1
                    return LATER
                return _taken(reattach, recorded=1)

            server.servicer.on_reattach = answer
            await server.stop()  # the dispatcher restarts
            await server.start()
            # The two refused streams never reach the queue: the third took the session.
            again = await server.servicer.next_slot()
            tried = server.servicer.reattaches
            assert [(r.session_id, r.task_id) for r in tried] == [(session_id, "task-1")] * 3
            assert not gate["cancelled"].is_set()
            gate["go"].set()
            packets = await again.recv_until_terminal()
            # "started" (seq 1) was recorded: only what came after it is written.
            assert [(p.WhichOneof("payload"), p.seq) for p in packets] == [
                ("content", 2),
                ("result", 3),
            ]
            assert packets[-1].result.result == "started done"
            assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    finally:
        await server.stop()


async def test_a_reattach_refused_for_now_until_the_window_ends_abandons_the_session() -> None:
    server = DispatcherServer()
    await server.start()
    commander = Commander(
        fast_connection(server.target), slots=1, planners=planners, handover_timeout=1.0
    )
    try:
        async with commander:
            await _running_session(server)
            server.servicer.on_reattach = lambda reattach: LATER
            await server.stop()
            await server.start()
            with anyio.fail_after(10):
                await gate["cancelled"].wait()
            tries = len(server.servicer.reattaches)
            # Retried within the window (1 s; delays 0.05, 0.1, 0.2, 0.3 s + jitter).
            assert tries >= 2, tries
            # Given up: the slot's next hellos re-attach nothing; it takes new work.
            # A re-attach hello already on its way when the slot gave up may still
            # be answered (now with the plain ack): skip that one stream.
            server.servicer.on_reattach = None
            slot = await server.servicer.next_slot()
            if slot.hello is not None and slot.hello.HasField("reattach"):
                slot = await server.servicer.next_slot()
            assert slot.hello is not None and not slot.hello.HasField("reattach")
            assert not commander.slots[0].busy
    finally:
        await server.stop()


async def test_a_final_refusal_abandons_the_session_at_once() -> None:
    server = DispatcherServer()
    await server.start()
    commander = Commander(
        fast_connection(server.target), slots=1, planners=planners, handover_timeout=30.0
    )
    try:
        async with commander:
            await _running_session(server)
            server.servicer.on_reattach = lambda reattach: ipb.DownstreamPacket(
                ack=ipb.Ack(
                    kind=ipb.ACK_KIND_HELLO,
                    slot_id="slot-y",
                    detail="re-attach refused: task is not running: the task ended FAILURE: x",
                )
            )
            await server.stop()
            await server.start()
            with anyio.fail_after(5):  # far less than the 30 s window
                await gate["cancelled"].wait()
            assert len(server.servicer.reattaches) == 1
            assert not commander.slots[0].busy
    finally:
        await server.stop()


async def test_retries_of_a_reattach_refused_for_now_slow_down_within_the_window() -> None:
    server = DispatcherServer()
    await server.start()
    # Refusals for now: delays of 0.1, 0.2, 0.4, then 0.8 s (8 x 0.1), each + 0..0.1 s.
    connection = fast_connection(server.target, reconnect_initial=0.1, reconnect_max=1.0)
    commander = Commander(connection, slots=1, planners=planners, handover_timeout=3.0)
    try:
        async with commander:
            await _running_session(server)
            server.servicer.on_reattach = lambda reattach: LATER
            await server.stop()
            await server.start()
            with anyio.fail_after(10):
                await gate["cancelled"].wait()
            at = list(server.servicer.reattached_at)
            gaps = [b - a for a, b in itertools.pairwise(at)]
            # Each wait is at least its delay; the first one stays short.
            bases = [0.1, 0.2, 0.4] + [0.8] * len(gaps)
            assert all(g >= b for g, b in zip(gaps, bases, strict=False)), gaps
            assert gaps[0] < 0.5, gaps
            # At a fixed 0.1-0.2 s pace a 3 s window holds 15 or more tries.
            assert 4 <= len(at) <= 8, gaps
    finally:
        await server.stop()


async def test_the_reconnect_delay_grows_per_refusal_for_now_and_resets_on_a_healthy_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While a session waits (urgent), each refusal for now doubles the delay from
    ``reconnect_initial`` up to 8 times it (or ``reconnect_max``); another failure
    (an address that is down) is followed by the short delay and keeps the count;
    a healthy stream starts it over."""
    config = ConnectionConfig(reconnect_initial=0.01, reconnect_max=1.0)
    # R: refused for now, F: another failure, H: a healthy stream that ended.
    script = list("RRRRRFRHRH")

    async def attempt() -> bool:
        what = script.pop(0)
        if what == "H":
            return True
        raise ConnectFailed(what, refused_for_now=what == "R")

    caplog.set_level(logging.WARNING, logger="commander.connection")
    with anyio.fail_after(10):
        await reconnect_forever(
            config, attempt, name="t", should_stop=lambda: not script, urgent=lambda: True
        )
    delays = [float(str(r.args[3])) for r in caplog.records if isinstance(r.args, tuple)]
    bases = [0.01, 0.02, 0.04, 0.08, 0.08, 0.01, 0.08, 0.01]
    assert len(delays) == len(bases), delays
    for delay, base in zip(delays, bases, strict=True):
        assert base <= delay <= base + 0.01, (delays, bases)


async def test_a_reattach_taken_after_the_slot_gave_up_ends_that_stream() -> None:
    """The dispatcher's ack comes after the hand-over window ran out: the slot ends
    that stream (the dispatcher then fails the task when its own window passes)
    instead of leaving the dispatcher a busy slot for a session nobody runs."""
    server = DispatcherServer()
    await server.start()
    commander = Commander(
        fast_connection(server.target), slots=1, planners=planners, handover_timeout=1.0
    )
    try:
        async with commander:
            await _running_session(server)
            server.servicer.reattach_delay = 1.5  # beyond the window, within the handshake's
            server.servicer.on_reattach = lambda reattach: _taken(reattach, recorded=1)
            await server.stop()
            await server.start()
            with anyio.fail_after(10):
                await gate["cancelled"].wait()
            late = await server.servicer.next_slot()
            assert late.hello is not None and late.hello.HasField("reattach")
            with anyio.fail_after(5):
                await late.ended.wait()
            assert [p.WhichOneof("payload") for p in late.received] == ["hello"]
            assert len(server.servicer.reattaches) == 1
            server.servicer.on_reattach = None
            fresh = await server.servicer.next_slot()
            assert fresh.hello is not None and not fresh.hello.HasField("reattach")
            assert not commander.slots[0].busy
    finally:
        await server.stop()
