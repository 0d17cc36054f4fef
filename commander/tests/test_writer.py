"""The stream's writer: the bounded hand-over queue, and content chunks folded
into one packet (with one seq) while they wait for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._handover import COALESCE_CHARS, Upstream
from commander._writer import QUEUE_LIMIT, YIELD_EVERY, Outgoing, StreamWriter

pytestmark = pytest.mark.anyio

Packet = ipb.UpstreamPacket


class Call:
    """A gRPC call's write side whose writes complete only while ``gate`` is set."""

    def __init__(self) -> None:
        self.written: list[Packet] = []
        self.half_closed = False
        self.gate = anyio.Event()
        self.gate.set()
        self.writing: Packet | None = None
        self._changed = anyio.Event()

    async def write(self, message: Packet) -> None:
        self.writing = message
        self._notify()
        await self.gate.wait()
        self.writing = None
        copy = Packet()
        copy.CopyFrom(message)  # as it went over the wire
        self.written.append(copy)
        self._notify()

    async def done_writing(self) -> None:
        self.half_closed = True
        self._notify()

    def hold(self) -> None:
        """Writes from now on wait for ``release``."""
        if self.gate.is_set():
            self.gate = anyio.Event()

    def release(self) -> None:
        self.gate.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait (at most 2 s) until ``predicate()`` holds."""
        with anyio.fail_after(2):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


@contextlib.asynccontextmanager
async def running(call: Call) -> AsyncIterator[StreamWriter[Packet]]:
    """A writer for ``call`` with its task running; closed at the end. The body
    has 5 s (a producer that waits for room in vain fails the test)."""
    writer = StreamWriter[Packet](call.write, call.done_writing)
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run)
                yield writer
                tg.cancel_scope.cancel()
    finally:
        writer.close()


def content(text: str, *, finish: bool = False) -> Outgoing[Packet]:
    chunk = ipb.ContentChunk(text=text, is_finish=finish)
    return Outgoing(Packet(session_id="s", content=chunk))


def thought(delta: str) -> Outgoing[Packet]:
    return Outgoing(Packet(session_id="s", thought=ipb.ThoughtChain(delta=delta)))


def shown(packets: list[Packet]) -> list[tuple[int, str]]:
    """(seq, content text or payload kind) of each packet."""
    return [
        (p.seq, p.content.text if p.HasField("content") else p.WhichOneof("payload") or "")
        for p in packets
    ]


async def test_a_lone_chunk_is_written_at_once() -> None:
    call = Call()
    up = Upstream("s", limit=100)
    async with running(call) as writer:
        up.attach_new(writer.send)
        await up.send(content("a"))
        await call.until(lambda: len(call.written) == 1)
        await up.send(content("b"))
        await call.until(lambda: len(call.written) == 2)
    assert shown(call.written) == [(1, "a"), (2, "b")]


async def test_chunks_that_wait_together_go_out_as_one_packet_with_one_seq() -> None:
    call = Call()
    up = Upstream("s", limit=100)
    async with running(call) as writer:
        up.attach_new(writer.send)
        call.hold()
        await up.send(content("a"))
        await call.until(lambda: call.writing is not None)
        # While "a" is being written the rest waits: folded, but never into
        # "a" (already on its way), across a thought, or after an answer's end.
        for out in (
            content("b"),
            content("c"),
            content("d"),
            thought("t"),
            content("e"),
            content("f", finish=True),
            content("g"),
        ):
            await up.send(out)
            assert out.taken
        call.release()
        await call.until(lambda: len(call.written) == 5)
    assert shown(call.written) == [(1, "a"), (2, "bcd"), (3, "thought"), (4, "ef"), (5, "g")]
    assert [p.content.is_finish for p in call.written] == [False, False, False, True, False]
    assert up.last_seq == 5 and up.pending == 5


async def test_a_folded_packet_stays_under_the_bound() -> None:
    call = Call()
    up = Upstream("s", limit=100)
    half = "x" * (COALESCE_CHARS // 2)
    async with running(call) as writer:
        up.attach_new(writer.send)
        call.hold()
        await up.send(content("a"))
        await call.until(lambda: call.writing is not None)
        for _ in range(3):
            await up.send(content(half))
        await up.send(content("y"))
        call.release()
        await call.until(lambda: len(call.written) == 3)
    assert [len(p.content.text) for p in call.written] == [1, COALESCE_CHARS, len(half) + 1]
    assert max(p.ByteSize() for p in call.written) < COALESCE_CHARS + 100


async def test_a_full_queue_holds_the_producer_back_and_a_cancel_hands_nothing_over() -> None:
    call = Call()
    up = Upstream("s", limit=100)
    async with running(call) as writer:
        up.attach_new(writer.send)
        call.hold()
        await up.send(thought("0"))
        await call.until(lambda: call.writing is not None)
        for i in range(QUEUE_LIMIT):
            await up.send(thought(str(i + 1)))  # thoughts are never folded
        blocked = thought("over")
        async with anyio.create_task_group() as tg:
            tg.start_soon(up.send, blocked)
            await anyio.wait_all_tasks_blocked()
            assert not blocked.taken, "the producer waits for room"
            tg.cancel_scope.cancel()
        assert not blocked.taken and up.last_seq == QUEUE_LIMIT + 1
        late = thought("late")
        async with anyio.create_task_group() as tg:
            tg.start_soon(up.send, late)
            call.release()
        assert late.taken
        await call.until(lambda: len(call.written) == QUEUE_LIMIT + 2)
    assert [p.seq for p in call.written] == list(range(1, QUEUE_LIMIT + 3))
    assert [p.thought.delta for p in call.written][-1] == "late"


async def test_a_folded_packet_is_resent_whole_and_only_if_not_recorded() -> None:
    call = Call()
    up = Upstream("s", limit=100)
    async with running(call) as writer:
        up.attach_new(writer.send)
        call.hold()
        await up.send(content("a"))
        await call.until(lambda: call.writing is not None)
        for text in "bcd":
            await up.send(content(text))
    # The stream broke with "a" in flight and "bcd" waiting: both are kept.
    up.detach()
    assert up.pending == 2
    await up.send(content("e"))  # kept while away: its own packet
    assert up.pending == 3

    second = Call()
    async with running(second) as writer:
        # The new dispatcher had recorded "a" (seq 1).
        assert await up.attach(writer.send, 1) == 2
        await up.send(content("f"))
        await second.until(lambda: len(second.written) >= 3)
    # Resent exactly as numbered ("bcd" is one packet, seq 2), then the new one.
    assert shown(second.written) == [(2, "bcd"), (3, "e"), (4, "f")]

    # A dispatcher that recorded the folded packet gets nothing of it again.
    up.detach()
    third = Call()
    async with running(third) as writer:
        assert await up.attach(writer.send, up.last_seq) == 0
    assert third.written == []


async def test_a_cancelled_producer_stops_within_yield_every_and_loses_nothing() -> None:
    call = Call()
    up = Upstream("s", limit=1000)
    taken: list[str] = []
    async with running(call) as writer:
        up.attach_new(writer.send)
        call.hold()
        await up.send(content("a"))
        await call.until(lambda: call.writing is not None)
        with anyio.CancelScope() as scope:
            scope.cancel()
            for i in range(2 * YIELD_EVERY):
                out = content(f"<{i}>")
                try:
                    await up.send(out)
                finally:
                    if out.taken:
                        assert out.message is not None
                        taken.append(out.message.content.text)
        assert scope.cancelled_caught
        assert 0 < len(taken) <= YIELD_EVERY
        call.release()
        await call.until(lambda: len(call.written) == 2)
    # Folded into one packet: exactly what was handed over, nothing else.
    assert shown(call.written) == [(1, "a"), (2, "".join(taken))]
    assert up.last_seq == 2


async def test_closing_fails_a_waiting_producer_and_later_sends() -> None:
    call = Call()
    writer = StreamWriter[Packet](call.write, call.done_writing)
    for i in range(QUEUE_LIMIT):
        await writer.send(thought(str(i)))
    failed: list[BaseException] = []

    async def producer() -> None:
        try:
            await writer.send(thought("blocked"))
        except anyio.ClosedResourceError as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await anyio.wait_all_tasks_blocked()
        writer.close()
    assert len(failed) == 1
    with pytest.raises(anyio.ClosedResourceError):
        await writer.send(thought("after"))
    await writer.run()  # closed: returns at once, writes nothing
    assert call.written == []


async def test_half_close_follows_what_was_queued_and_nothing_goes_after_it() -> None:
    call = Call()
    async with running(call) as writer:
        call.hold()
        await writer.write(Packet(session_id="s", thought=ipb.ThoughtChain(delta="0")))
        await call.until(lambda: call.writing is not None)
        await writer.write(Packet(session_id="s", thought=ipb.ThoughtChain(delta="1")))
        await writer.half_close()
        await writer.write(Packet(session_id="s", thought=ipb.ThoughtChain(delta="late")))
        call.release()
        await call.until(lambda: call.half_closed)
        await anyio.wait_all_tasks_blocked()
    assert [p.thought.delta for p in call.written] == ["0", "1"]


async def test_discard_drops_waiting_messages_only_and_frees_room() -> None:
    call = Call()
    async with running(call) as writer:
        call.hold()
        await writer.write(Packet(session_id="s", content=ipb.ContentChunk(text="a")))
        await call.until(lambda: call.writing is not None)
        kept = Packet(session_id="s", stopped=ipb.Stopped(reason="x"))
        for i in range(QUEUE_LIMIT - 1):
            await writer.write(Packet(session_id="s", content=ipb.ContentChunk(text=f"q{i}")))
        await writer.write(kept)
        late = Outgoing(Packet(session_id="s", content=ipb.ContentChunk(text="late")))
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.send, late)  # the queue is full: it waits for room
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert not late.taken
            dropped = writer.discard(lambda p: p.HasField("content"))
            assert dropped == QUEUE_LIMIT - 1
        assert late.taken  # room at once, without a write completing
        call.release()
        await call.until(lambda: len(call.written) == 3)
    # "a" was being written: it goes out; the queued chunks do not.
    assert shown(call.written) == [(0, "a"), (0, "stopped"), (0, "late")]
