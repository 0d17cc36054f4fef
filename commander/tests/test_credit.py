"""The credit window (``Upstream(window=)``, ``--content-window``): content that
needs a seq of its own waits for the dispatcher's acks, control never does."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import anyio
import pytest

from commander._context import PlannerOutput, SessionContext
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._handover import COALESCE_CHARS, WINDOW_CHARS, Upstream
from commander._session import Session
from commander._writer import Outgoing
from commander.tests.test_writer import Call, Packet, content, running, shown

pytestmark = pytest.mark.anyio


def stopped() -> Outgoing[Packet]:
    return Outgoing(Packet(session_id="s", stopped=ipb.Stopped(reason="stop")))


async def test_a_stopped_is_written_while_content_waits_for_credit() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=2)
    async with running(call) as writer:
        up.attach_new(writer.send)
        up.on_ack(0)  # the dispatcher acknowledges (nothing yet)
        await up.send(content("a"))
        await call.until(lambda: len(call.written) == 1)
        await up.send(content("b"))
        await call.until(lambda: len(call.written) == 2)
        # Two packets unacknowledged: the next content chunk waits for credit
        # (the planner's task, which the stop cancels).
        waiting = content("c")
        planner = anyio.CancelScope()

        async def plan() -> None:
            with planner:
                await up.send(waiting)

        async with anyio.create_task_group() as tg:
            tg.start_soon(plan)
            with anyio.fail_after(2):
                while not up._lock.locked():  # the planner's send holds it
                    await anyio.lowlevel.checkpoint()
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert not waiting.taken and len(call.written) == 2
            planner.cancel()  # the stop
        assert not waiting.taken and up.last_seq == 2
        # No ack came, yet the stopped goes out at once, right after "b".
        out = stopped()
        await up.send(out)
        assert out.taken
        await call.until(lambda: len(call.written) == 3)
    assert shown(call.written) == [(1, "a"), (2, "b"), (3, "stopped")]


async def test_content_resumes_on_ack_and_folds_while_it_waits() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=2)
    async with running(call) as writer:
        up.attach_new(writer.send)
        up.on_ack(0)  # the dispatcher acknowledges (nothing yet)
        call.hold()  # the stream is slow: packets wait in the writer's queue
        await up.send(content("a"))
        await call.until(lambda: call.writing is not None)
        await up.send(content("b"))
        # No credit left, but "c" and "d" fold into "b", still queued: no wait.
        for text in "cd":
            out = content(text)
            await up.send(out)
            assert out.taken
        assert up.last_seq == 2
        call.release()
        await call.until(lambda: len(call.written) == 2)
        waiting = content("e")  # "bcd" is on the wire: "e" needs a seq, and credit
        async with anyio.create_task_group() as tg:
            tg.start_soon(up.send, waiting)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert not waiting.taken and up.last_seq == 2
            up.on_ack(1)  # one packet recorded: credit for one more
        assert waiting.taken
        await call.until(lambda: len(call.written) == 3)
    assert shown(call.written) == [(1, "a"), (2, "bcd"), (3, "e")]


async def test_window_zero_writes_without_waiting_for_acks() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=0)
    async with running(call) as writer:
        up.attach_new(writer.send)
        up.on_ack(0)  # the dispatcher acknowledges (nothing yet)
        for i in range(20):
            await up.send(content(str(i % 10)))
            await call.until(functools.partial(lambda n: len(call.written) == n, i + 1))
    assert up.pending == 20 and [seq for seq, _ in shown(call.written)] == list(range(1, 21))


async def test_content_waiting_for_credit_while_away_is_kept_up_to_the_buffer() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=1)
    async with running(call) as writer:
        up.attach_new(writer.send)
        up.on_ack(0)  # the dispatcher acknowledges (nothing yet)
        await up.send(content("a"))
        await call.until(lambda: len(call.written) == 1)
        waiting = content("b")
        async with anyio.create_task_group() as tg:
            tg.start_soon(up.send, waiting)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert not waiting.taken
            up.detach()  # the stream is lost: kept for the re-attach, no credit needed
        assert waiting.taken and up.pending == 2
    resent = Call()
    async with running(resent) as writer:
        assert await up.attach(writer.send, 0) == 2
        await resent.until(lambda: len(resent.written) == 2)
    assert shown(resent.written) == [(1, "a"), (2, "b")]


async def test_content_also_waits_while_window_chars_of_it_are_unacknowledged() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=64)
    async with running(call) as writer:
        up.attach_new(writer.send)
        up.on_ack(0)  # the dispatcher acknowledges (nothing yet)
        await up.send(content("x" * WINDOW_CHARS))
        await call.until(lambda: len(call.written) == 1)
        waiting = content("y")  # one packet of 64 out, but its characters fill the window
        async with anyio.create_task_group() as tg:
            tg.start_soon(up.send, waiting)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert not waiting.taken
            up.on_ack(1)
        assert waiting.taken
        await call.until(lambda: len(call.written) == 2)
    assert shown(call.written)[1] == (2, "y")


async def test_a_dispatcher_that_never_acknowledges_gets_no_window() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=2)
    async with running(call) as writer:
        up.attach_new(writer.send)
        for text in "abc":
            await up.send(content(text))
            await call.until(functools.partial(lambda n: len(call.written) == n, up.last_seq))
    assert shown(call.written) == [(1, "a"), (2, "b"), (3, "c")]


async def test_content_without_credit_is_held_folded_and_released_on_ack() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=2)
    async with running(call) as writer:
        up.attach_new(writer.send, writer.send_nowait)
        up.on_ack(0)
        for text in "ab":
            await up.send(content(text))
            await call.until(functools.partial(lambda n: len(call.written) == n, up.last_seq))
        # No credit: the planner does not wait; its chunks fold into one held packet.
        for text in "cde":
            out = content(text)
            await up.send(out)
            assert out.taken
        assert up.last_seq == 3
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert len(call.written) == 2  # held, not written
        up.on_ack(1)  # credit for one: the held packet goes out
        await call.until(lambda: len(call.written) == 3)
        # Held again ("f", no credit); the stopped does not wait, but never
        # overtakes it: the held packet goes first.
        await up.send(content("f"))
        out = stopped()
        await up.send(out)
        assert out.taken
        await call.until(lambda: len(call.written) == 5)
    assert shown(call.written) == [(1, "a"), (2, "b"), (3, "cde"), (4, "f"), (5, "stopped")]


async def test_a_held_packet_is_resent_after_a_detach() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=1)
    async with running(call) as writer:
        up.attach_new(writer.send, writer.send_nowait)
        up.on_ack(0)
        await up.send(content("a"))
        await call.until(lambda: len(call.written) == 1)
        await up.send(content("b"))  # held
        await up.send(content("c"))  # folded into it
        up.detach()
    resent = Call()
    async with running(resent) as writer:
        assert await up.attach(writer.send, 1, writer.send_nowait) == 1
        await resent.until(lambda: len(resent.written) == 1)
    assert shown(call.written) == [(1, "a")]
    assert shown(resent.written) == [(2, "bc")]


async def test_fold_content_folds_into_the_held_packet_only_where_send_would() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=1)
    async with running(call) as writer:
        up.attach_new(writer.send, writer.send_nowait)
        assert not up.fold_content("x", False)  # nothing held
        up.on_ack(0)
        await up.send(content("a"))
        await call.until(lambda: len(call.written) == 1)
        assert not up.fold_content("x", False)  # no credit, but nothing held yet
        await up.send(content("b"))  # held
        assert up.fold_content("c", False)
        await up._lock.acquire()  # another producer hands over: not now
        assert not up.fold_content("x", False)
        up._lock.release()
        assert not up.fold_content("x" * COALESCE_CHARS, False)  # the held packet is full
        assert up.fold_content("d", True)
        assert not up.fold_content("e", False)  # past an answer's end
        assert up.last_seq == 2 and up.pending == 2
        up.on_ack(1)  # credit: the held packet goes out
        await call.until(lambda: len(call.written) == 2)
        assert not up.fold_content("e", False)  # nothing held: ``send`` numbers it
    assert shown(call.written) == [(1, "a"), (2, "bcd")]
    assert call.written[1].content.is_finish


async def test_a_session_folds_a_flood_into_the_held_packet() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=1)
    start = ipb.DownstreamPacket(session_id="s", start=ipb.StartSession(instruction="go"))

    async def flood(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
        for text in "abcdef":
            yield ipb.ContentChunk(text=text)
        yield ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="done")

    folded: list[str] = []

    def fold(text: str, is_finish: bool) -> bool:
        if up.fold_content(text, is_finish):
            folded.append(text)
            return True
        return False

    session = Session(start, flood, up.send, slot_index=0, fold=fold)
    async with running(call) as writer:
        up.attach_new(writer.send, writer.send_nowait, writer.take_fold)
        up.on_ack(0)
        call.hold()  # "a" is being written when "b" comes: no credit for "b"
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.run, tg)
            await call.until(lambda: up.last_seq == 3)  # a, held "b…", the result
            call.release()
            # The result waits for nothing, yet goes out after the held packet.
            await call.until(lambda: len(call.written) == 3)
            session.closed.set()
    assert shown(call.written) == [(1, "a"), (2, "bcdef"), (3, "result")]
    assert folded == list("cdef")  # without a packet, lock or hand-over of their own


async def test_fold_content_folds_into_the_queued_packet_and_keeps_the_yields() -> None:
    call = Call()
    up = Upstream("s", limit=100, window=64)
    async with running(call) as writer:
        up.attach_new(writer.send, writer.send_nowait, writer.take_fold)
        up.on_ack(0)
        call.hold()  # the stream is slow: packets wait in the writer's queue
        await up.send(content("a"))
        await call.until(lambda: call.writing is not None)  # "a" is being written
        assert not up.fold_content("x", False)  # not into a packet being written
        await up.send(content("b"))  # queued behind it
        writer._since_yield = 0
        assert up.fold_content("c", False)
        assert up.fold_content("d", False)
        assert up.fold_content("e", False)
        # The fourth hand-over would yield to the loop: left to ``send``.
        assert not up.fold_content("f", False)
        await up.send(content("f"))  # folded by ``send`` (after its yield)
        assert up.last_seq == 2
        up.on_ack(2)  # "b…" acknowledged while still queued: never folded into again
        assert not up.fold_content("g", False)
        call.release()
        await call.until(lambda: len(call.written) == 2)
        up.detach()
        assert not up.fold_content("g", False)
    assert shown(call.written) == [(1, "a"), (2, "bcdef")]
