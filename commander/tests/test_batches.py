"""Upstream batches: the writer sends the packets it finds waiting as one
``UpstreamBatch`` message, up to what the dispatcher's hello ack announced
(``max_upstream_batch``); a lone packet goes alone, at once, and nothing is
batched for a dispatcher that announced nothing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from commander import Commander, PlannerRegistry, SessionContext
from commander._context import PlannerOutput
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._handover import Upstream
from commander._slot import _batch, _size
from commander._writer import BATCH_BYTES, Outgoing, StreamWriter
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer, FakeDispatcher, running
from commander.tests.test_fence import FakeStream, make_slot
from commander.tests.test_writer import Call, Packet, content, shown, thought

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def batching(
    call: Call, limit: int, accept: Callable[[Packet], bool] | None = None
) -> AsyncIterator[StreamWriter[Packet]]:
    """A writer for ``call`` that batches up to ``limit`` (0: never), its task running."""
    writer = StreamWriter[Packet](call.write, call.done_writing, accept)
    if limit:
        writer.enable_batches(limit, _batch, _size)
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run)
                yield writer
                tg.cancel_scope.cancel()
    finally:
        writer.close()


def messages(call: Call) -> list[list[tuple[int, str]]]:
    """What each write carried: [packet] alone, or a batch's packets."""
    return [
        shown(list(m.batch.packets)) if m.HasField("batch") else shown([m]) for m in call.written
    ]


async def test_packets_that_wait_together_go_out_as_one_batch() -> None:
    call = Call()
    up = Upstream("s", limit=100)
    async with batching(call, 256) as writer:
        up.attach_new(writer.send)
        call.hold()
        await up.send(thought("a"))
        await call.until(lambda: call.writing is not None)
        for text in "bcd":  # wait behind "a", which is being written
            await up.send(thought(text))
        call.release()
        await call.until(lambda: len(call.written) == 2)
    assert messages(call) == [[(1, "thought")], [(2, "thought"), (3, "thought"), (4, "thought")]]
    assert (writer.batches, writer.batched) == (1, 3)


async def test_a_lone_packet_goes_alone_and_at_once() -> None:
    call = Call()
    up = Upstream("s", limit=100)
    async with batching(call, 256) as writer:
        up.attach_new(writer.send)
        await up.send(thought("a"))
        await call.until(lambda: len(call.written) == 1)  # nothing waits for a second
        await up.send(content("b"))
        await call.until(lambda: len(call.written) == 2)
    assert [m.WhichOneof("payload") for m in call.written] == ["thought", "content"]
    assert writer.batches == 0


async def test_the_announced_limit_is_kept() -> None:
    call = Call()
    async with batching(call, 2) as writer:
        call.hold()
        await writer.write(Packet(session_id="s", seq=1, thought=ipb.ThoughtChain(delta="0")))
        await call.until(lambda: call.writing is not None)
        for i in range(2, 6):  # four wait: two batches of two
            await writer.write(Packet(session_id="s", seq=i, thought=ipb.ThoughtChain(delta="x")))
        call.release()
        await call.until(lambda: len(call.written) == 3)
    assert [[seq for seq, _ in m] for m in messages(call)] == [[1], [2, 3], [4, 5]]


async def test_no_batches_unless_enabled() -> None:
    call = Call()
    up = Upstream("s", limit=100)
    async with batching(call, 0) as writer:
        up.attach_new(writer.send)
        call.hold()
        await up.send(thought("a"))
        await call.until(lambda: call.writing is not None)
        for text in "bcd":
            await up.send(thought(text))
        call.release()
        await call.until(lambda: len(call.written) == 4)
    assert not any(m.HasField("batch") for m in call.written)
    assert shown(call.written) == [(i, "thought") for i in range(1, 5)]


async def test_a_batch_keeps_within_its_bytes_and_before_a_half_close() -> None:
    call = Call()
    big = "x" * (BATCH_BYTES // 2)
    async with batching(call, 256) as writer:
        call.hold()
        await writer.write(Packet(session_id="s", seq=1, thought=ipb.ThoughtChain(delta="0")))
        await call.until(lambda: call.writing is not None)
        for i in (2, 3, 4):  # three halves of BATCH_BYTES: one fits with 5, not two
            await writer.write(Packet(session_id="s", seq=i, thought=ipb.ThoughtChain(delta=big)))
        await writer.half_close()
        call.release()
        await call.until(lambda: call.half_closed)
    assert [[seq for seq, _ in m] for m in messages(call)] == [[1], [2], [3], [4]]
    assert all(len(m.SerializeToString()) <= BATCH_BYTES + 16 for m in call.written)


async def test_a_half_close_ends_the_batch_before_it() -> None:
    call = Call()
    async with batching(call, 256) as writer:
        call.hold()
        await writer.write(Packet(session_id="s", seq=1, thought=ipb.ThoughtChain(delta="0")))
        await call.until(lambda: call.writing is not None)
        for i in (2, 3):
            await writer.write(Packet(session_id="s", seq=i, thought=ipb.ThoughtChain(delta="x")))
        await writer.half_close()
        await writer.write(Packet(session_id="s", seq=4, thought=ipb.ThoughtChain(delta="late")))
        call.release()
        await call.until(lambda: call.half_closed)
        await anyio.wait_all_tasks_blocked()
    assert [[seq for seq, _ in m] for m in messages(call)] == [[1], [2, 3]]


async def test_a_stopped_rides_with_what_waited_before_it_never_ahead_of_it() -> None:
    call = Call()
    slot = make_slot()
    up = Upstream("s", limit=100)
    async with batching(call, 256, slot._accept) as writer:
        up.attach_new(writer.send)
        call.hold()
        await up.send(content("a"))
        await call.until(lambda: call.writing is not None)
        await up.send(content("b"))  # waits (and "c" folds into it)
        await up.send(content("c"))
        await up.send(Outgoing(Packet(session_id="s", tool_call=ipb.ToolCallRequest(call_id="1"))))
        slot._fence("s", FakeStream(writer))  # type: ignore[arg-type]  # the stop drops "bc"
        await up.send(Outgoing(Packet(session_id="s", stopped=ipb.Stopped(reason="stop"))))
        call.release()
        await call.until(lambda: len(call.written) == 2)
    # "a" was on its way; the tool call and the stopped go out in one message,
    # in their order: nothing waits behind dropped content, nothing overtakes.
    assert messages(call) == [[(1, "a")], [(3, "tool_call"), (4, "stopped")]]


async def test_a_resend_after_a_handover_is_batched_with_its_seqs() -> None:
    first, second = Call(), Call()
    up = Upstream("s", limit=100)
    async with batching(first, 256) as writer:
        up.attach_new(writer.send)
        first.hold()
        await up.send(thought("a"))
        await first.until(lambda: first.writing is not None)
        for text in "bcd":
            await up.send(thought(text))
        first.release()
        await first.until(lambda: len(first.written) == 2)
    assert messages(first) == [[(1, "thought")], [(2, "thought"), (3, "thought"), (4, "thought")]]
    up.on_ack(2)  # recorded up to 2; the stream is lost before 3 and 4 are
    up.detach()
    async with batching(second, 256) as writer:
        resent = await up.attach(writer.send, 2)
        assert resent == 2
        await second.until(lambda: len(second.written) == 1)
        await up.send(thought("e"))
        await second.until(lambda: len(second.written) == 2)
    # Exactly what was not recorded, with its own seqs, then the next one.
    assert messages(second) == [[(3, "thought"), (4, "thought")], [(5, "thought")]]


# --- against the fake dispatcher's real gRPC stream ----------------------------------

burst = PlannerRegistry()
THOUGHTS = 200


@burst.register("burst")
async def _burst(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    for i in range(THOUGHTS):
        yield ipb.ThoughtChain(delta=f"t{i}")  # never folded: each is a packet
    yield ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="done")


@pytest.mark.parametrize("announced", [0, 3])
async def test_a_slot_batches_only_what_the_dispatcher_announced(announced: int) -> None:
    fake = FakeDispatcher(max_upstream_batch=announced)
    async with running(DispatcherServer(fake)) as server:
        commander = Commander(fast_connection(server.target), slots=1, planners=burst)
        async with commander:
            slot = await fake.next_slot()
            session_id = await slot.start("go", planner="burst")
            packets = await slot.recv_until_terminal()
    assert [p.seq for p in packets] == list(range(1, THOUGHTS + 2))
    assert [p.thought.delta for p in packets[:-1]] == [f"t{i}" for i in range(THOUGHTS)]
    assert all(p.session_id == session_id for p in packets)
    assert packets[-1].result.result == "done"
    if announced:
        # The planner is faster than the stream: packets wait, and go in batches.
        assert slot.batches and max(slot.batches) <= announced
    else:
        assert slot.batches == []
