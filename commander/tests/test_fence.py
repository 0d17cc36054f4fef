"""The dispatcher's stop fences the session's output: what of it the slot has
not written yet is dropped (the dispatcher would drop it), so ``stopped`` waits
only for the write under way, not for the session's queued content."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from commander._connection import ConnectionConfig
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._handover import Upstream
from commander._slot import Slot, SlotSettings
from commander._writer import Outgoing, StreamWriter
from commander.tests.test_writer import Call, Packet, content, shown, thought

pytestmark = pytest.mark.anyio


def make_slot() -> Slot:
    settings = SlotSettings(
        connection=ConnectionConfig(target="127.0.0.1:1"),
        hello=ipb.Hello(),
        resolve_planner=lambda name: KeyError(name),
        draining=anyio.Event(),
        shutdown_grace=1.0,
        stop_cancel_timeout=1.0,
        closed_timeout=1.0,
    )
    return Slot(0, settings)


class FakeStream:
    def __init__(self, writer: StreamWriter[Packet]) -> None:
        self.writer = writer


def packet(session_id: str, **payload: Any) -> Outgoing[Packet]:
    return Outgoing(Packet(session_id=session_id, **payload))


async def test_a_stop_drops_the_sessions_unwritten_output_and_nothing_else() -> None:
    call = Call()
    slot = make_slot()
    writer = StreamWriter[Packet](call.write, call.done_writing, slot._accept)
    up = Upstream("s", limit=100)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            up.attach_new(writer.send, writer.send_nowait)
            call.hold()
            await up.send(content("a"))
            await call.until(lambda: call.writing is not None)
            # Waiting behind "a": content (folded), a thought, a tool call.
            for out in (content("b"), content("c"), thought("t")):
                await up.send(out)
            call_packet = packet("s", tool_call=ipb.ToolCallRequest(call_id="c1", tool_name="echo"))
            await up.send(call_packet)
            other = packet("other", content=ipb.ContentChunk(text="not fenced"))
            await writer.send(other)
            slot._fence("s", FakeStream(writer))  # type: ignore[arg-type]
            # Output the planner still makes before it sees its cancellation:
            # dropped at the gate.
            await up.send(content("late"))
            await up.send(packet("s", stopped=ipb.Stopped(reason="stop")))
            call.release()
            await call.until(lambda: len(call.written) == 4)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    writer.close()
    # "a" was on its way; then only what the dispatcher does not fence, in order.
    assert [(p.session_id, *shown([p])[0]) for p in call.written] == [
        ("s", 1, "a"),
        ("s", 4, "tool_call"),
        ("other", 0, "not fenced"),
        ("s", 6, "stopped"),
    ]
    # The dropped packets' seqs are acknowledged with the stopped's (the
    # dispatcher allows the gap): nothing is kept for a resend.
    up.on_ack(6)
    assert up.pending == 0


async def test_a_session_not_stopped_is_not_fenced() -> None:
    slot = make_slot()
    slot._fenced["s"] = None
    assert not slot._accept(Packet(session_id="s", content=ipb.ContentChunk(text="x")))
    assert slot._accept(Packet(session_id="s", usage=ipb.Usage(output_tokens=1)))
    assert slot._accept(Packet(session_id="t", content=ipb.ContentChunk(text="x")))
