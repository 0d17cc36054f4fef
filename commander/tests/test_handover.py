"""Session hand-over, the commander's pieces: the numbered upstream buffer, and what a
session does with tool calls in flight when it re-attaches (docs/protocol.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from commander._errors import ToolUnavailableError
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._handover import SessionAbandoned, Upstream
from commander._session import LOST_IN_HAND_OVER, Session
from commander._writer import Outgoing

pytestmark = pytest.mark.anyio


class Wire:
    """A stream's writer as the upstream sees it: records what it takes."""

    def __init__(self) -> None:
        self.packets: list[ipb.UpstreamPacket] = []
        self.sent = anyio.Event()

    async def send(self, out: Outgoing[ipb.UpstreamPacket]) -> None:
        out.taken = True
        assert out.message is not None
        self.packets.append(out.message)
        self.sent.set()
        self.sent = anyio.Event()

    def seqs(self) -> list[int]:
        return [p.seq for p in self.packets]


def content(text: str) -> Outgoing[ipb.UpstreamPacket]:
    return Outgoing(ipb.UpstreamPacket(session_id="s", content=ipb.ContentChunk(text=text)))


async def test_resends_exactly_what_the_new_dispatcher_lacks() -> None:
    up = Upstream("s", limit=100)
    first = Wire()
    up.attach_new(first.send)
    for text in "abc":
        await up.send(content(text))
    assert first.seqs() == [1, 2, 3]
    up.on_ack(2)
    assert up.pending == 1
    up.detach()  # the dispatcher is gone
    for text in "de":
        out = content(text)
        await up.send(out)
        assert out.taken  # kept: it goes out after the re-attach
    assert first.seqs() == [1, 2, 3]  # nothing written while away
    second = Wire()
    # The new dispatcher recorded up to 3 (it was durable before the crash).
    assert await up.attach(second.send, 3) == 2
    assert second.seqs() == [4, 5]
    assert [p.content.text for p in second.packets] == ["d", "e"]
    await up.send(content("f"))
    assert second.seqs() == [4, 5, 6]


async def test_a_packet_cancelled_before_the_writer_took_it_is_not_numbered() -> None:
    up = Upstream("s", limit=100)

    async def stuck(out: Outgoing[ipb.UpstreamPacket]) -> None:
        await anyio.sleep_forever()

    up.attach_new(stuck)
    out = content("lost")
    with anyio.move_on_after(0.05):
        await up.send(out)
    assert not out.taken and up.pending == 0 and up.last_seq == 0
    wire = Wire()
    assert await up.attach(wire.send, 0) == 0
    await up.send(content("next"))
    assert wire.seqs() == [1]  # no gap for the packet that never went out


async def test_full_buffer_waits_for_acks_while_attached_and_abandons_while_away() -> None:
    up = Upstream("s", limit=2)
    wire = Wire()
    up.attach_new(wire.send)
    await up.send(content("a"))
    await up.send(content("b"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(up.send, content("c"))
        await anyio.sleep(0.02)
        assert wire.seqs() == [1, 2]  # waits for room
        up.on_ack(1)
    assert wire.seqs() == [1, 2, 3]

    reasons: list[str] = []
    up.on_abandon(reasons.append)
    up.detach()
    with pytest.raises(SessionAbandoned):
        await up.send(content("d"))
    assert reasons and "--handover-buffer" in reasons[0]
    with pytest.raises(SessionAbandoned):
        await up.send(content("e"))


_made: list[Session] = []


@pytest.fixture(autouse=True)
def _close_sessions() -> Iterator[None]:
    """Sessions made here never run: close the user-input stream they open."""
    yield
    while _made:
        s = _made.pop()
        s._ui_send.close()
        s.user_input_receiver.close()


def _session(up: Upstream) -> Session:
    start = ipb.DownstreamPacket(
        session_id="s",
        start=ipb.StartSession(
            task_id="t",
            attempt=1,
            tools=[ipb.ToolSpec(name="idem", idempotent=True), ipb.ToolSpec(name="once")],
        ),
    )
    session = Session(start, RuntimeError("no planner"), up.send, slot_index=0)
    _made.append(session)
    return session


async def _until(wire: Wire, n: int) -> None:
    with anyio.fail_after(2):
        while len(wire.packets) < n:
            await wire.sent.wait()


@pytest.fixture
async def attached() -> AsyncIterator[tuple[Upstream, Wire]]:
    up = Upstream("s", limit=100)
    wire = Wire()
    up.attach_new(wire.send)
    yield up, wire


async def test_lost_call_of_a_tool_not_idempotent_gets_a_retryable_error(
    attached: tuple[Upstream, Wire],
) -> None:
    up, wire = attached
    session = _session(up)
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await session.call_tool("once", "{}")
        except ToolUnavailableError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await _until(wire, 1)
        up.detach()
        session.detached()
        second = Wire()
        await up.attach(second.send, 1)  # the old dispatcher had recorded the call
        session.reattached(1, 2)
        await _until(second, 1)
    assert errors and "may or may not have run" in str(errors[0])
    assert second.packets[0].error.code == LOST_IN_HAND_OVER  # watchers learn of it
    assert not [p for p in second.packets if p.HasField("tool_call")], "issued again"
    assert session.attempt == 2


async def test_lost_call_of_an_idempotent_tool_is_issued_again(
    attached: tuple[Upstream, Wire],
) -> None:
    up, wire = attached
    session = _session(up)
    results: list[str] = []

    async def call() -> None:
        results.append(await session.call_tool("idem", '{"x": 1}'))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await _until(wire, 1)
        first_id = wire.packets[0].tool_call.call_id
        up.detach()
        session.detached()
        second = Wire()
        await up.attach(second.send, 1)
        session.reattached(1, 2)
        await _until(second, 1)
        again = second.packets[0].tool_call
        assert again.tool_name == "idem" and again.arguments_json == '{"x": 1}'
        assert again.call_id != first_id and second.packets[0].seq == 2
        session.deliver_tool_result(ipb.ToolCallResult(call_id=again.call_id, result_json="42"))
    assert results == ["42"]


async def test_call_not_yet_recorded_is_the_new_dispatchers_to_answer(
    attached: tuple[Upstream, Wire],
) -> None:
    up, wire = attached
    session = _session(up)
    results: list[str] = []

    async def call() -> None:
        results.append(await session.call_tool("once", "{}"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await _until(wire, 1)
        up.detach()
        session.detached()
        second = Wire()
        await up.attach(second.send, 0)  # the call was not recorded: resent as it was
        session.reattached(0, 2)
        assert second.packets[0].tool_call.call_id == wire.packets[0].tool_call.call_id
        session.deliver_tool_result(
            ipb.ToolCallResult(call_id=wire.packets[0].tool_call.call_id, result_json="ok")
        )
    assert results == ["ok"]
