"""One slot: a ChatStream to the dispatcher that runs one session at a time.

The stream's lifecycle (attempt, handshake, reconnect, abort; its single
reader and writer) is :mod:`commander._stream`'s; this module adds what is
particular to a slot: the hello and its ack, the read loop that hands
downstream packets to the session, and draining on shutdown. Sessions and
planners talk to the reader through events, to the writer through the
session's :class:`~commander._handover.Upstream`; they never touch the gRPC
call.

Session hand-over (docs/protocol.md): a session runs in the slot's own task
group, not the stream's, so it outlives its stream. When the stream is lost
(or the dispatcher says ``move``) the session goes on, its packets wait in
its Upstream, and the next stream's hello re-attaches it (``hello.reattach``);
the dispatcher's answer says which packets it recorded, and the rest are
written again. No re-attach within ``handover_timeout`` abandons the session.
With ``handover_timeout`` 0 a session ends with its stream, as before.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import grpc
import grpc.aio
from anyio.abc import TaskGroup

from commander import _metrics
from commander._connection import ConnectionConfig, describe_error, now_us, open_stream
from commander._context import Planner
from commander._errors import stop_code_name
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import interaction_pb2_grpc
from commander._handover import Upstream
from commander._session import Session
from commander._stream import ReconnectingStream, RefusedForNow, Stream, StreamEnded
from commander._timeouts import DRAIN_EOF_TIMEOUT, LOCAL_STOP_SLACK
from commander._writer import Outgoing, StreamWriter

_log = logging.getLogger("commander.slot")

_TERMINAL = frozenset({"result", "stopped"})
#: Planner output the dispatcher's stop fences: once it has decided a stop it
#: drops these (dispatcher_go internal/session/fenced.go), so whatever of them
#: the slot has not written yet when the stop arrives is dropped here instead
#: of being written ahead of the ``stopped``. Tool calls and usage go on.
_FENCED = frozenset({"content", "thought", "stage", "artifact", "error"})

#: A slot's stream: upstream packets out, downstream packets in.
SlotStream = Stream[ipb.UpstreamPacket, ipb.DownstreamPacket]


#: How the status of a re-attach the dispatcher refused for now begins
#: (``ErrReattachLater``, docs/protocol.md "Session hand-over").
REATTACH_LATER = "re-attach refused for now"


def _refused_for_now(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the stream ended UNAVAILABLE as a re-attach refused for now."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and REATTACH_LATER in (exc.details() or "")


def _batch(packets: list[ipb.UpstreamPacket]) -> ipb.UpstreamPacket:
    """Several waiting packets as one message (copies: the kept ones stay as they are)."""
    return ipb.UpstreamPacket(batch=ipb.UpstreamBatch(packets=packets))


def _size(packet: ipb.UpstreamPacket) -> int:
    return packet.ByteSize()


class SlotSettings:
    """What every slot of a commander shares (internal)."""

    def __init__(
        self,
        *,
        connection: ConnectionConfig,
        hello: ipb.Hello,
        resolve_planner: Callable[[str], Planner | Exception],
        draining: anyio.Event,
        shutdown_grace: float,
        stop_cancel_timeout: float,
        closed_timeout: float,
        handover_buffer: int = 4096,
        handover_timeout: float = 60.0,
        content_window: int = 0,
    ) -> None:
        self.handover_buffer = handover_buffer
        self.content_window = content_window
        self.handover_timeout = handover_timeout
        self.connection = connection
        self.hello = hello
        self.resolve_planner = resolve_planner
        self.draining = draining
        self.shutdown_grace = shutdown_grace
        self.stop_cancel_timeout = stop_cancel_timeout
        self.closed_timeout = closed_timeout


class Slot:
    """A slot of the commander: connects, reconnects, runs sessions (internal)."""

    def __init__(self, index: int, settings: SlotSettings) -> None:
        self.index = index
        self._s = settings
        self._name = f"slot {index}"
        self._session: Session | None = None
        self._upstream: Upstream | None = None
        self._abandoned: Session | None = None
        # Sessions whose terminal packet was written: session id → its seq.
        self._ended: collections.OrderedDict[str, int] = collections.OrderedDict()
        # Sessions the dispatcher stopped: their fenced output is not written.
        self._fenced: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._tg: anyio.abc.TaskGroup | None = None
        self.slot_id = ""
        #: Whether the hello is acknowledged on the current stream.
        self.connected = False
        self._connection_changed = anyio.Event()
        self._stream = ReconnectingStream[ipb.UpstreamPacket, ipb.DownstreamPacket](
            settings.connection,
            name=self._name,
            open_call=self._open,
            receive=ipb.DownstreamPacket,
            handshake=self._handshake,
            serve=self._read_loop,
            gate=self._accept,
            on_closed=self._on_closed,
            on_lost=self._report_lost,
            no_answer="no answer to hello in time",
            # A session waiting to re-attach: look for a dispatcher often.
            urgent=lambda: self._session is not None,
        )

    def _set_connected(self, value: bool) -> None:
        metrics = _metrics.current
        if metrics is not None and value != self.connected:
            metrics.slot_connected(1 if value else -1)
        self.connected = value
        changed, self._connection_changed = self._connection_changed, anyio.Event()
        changed.set()

    async def wait_connected(self) -> None:
        """Wait until the slot's hello is acknowledged (at once if it is)."""
        while not self.connected:
            await self._connection_changed.wait()

    @property
    def busy(self) -> bool:
        """Whether a session runs on this slot."""
        return self._session is not None

    @property
    def handover(self) -> bool:
        """Whether sessions outlive their stream (see the module doc)."""
        return self._s.handover_timeout > 0

    async def run(self) -> None:
        """Serve until the commander drains; reconnect whenever the stream breaks."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self._stream.run(self._s.draining, self._drain)
            # A session left without a stream at shutdown ends with the slot.
            tg.cancel_scope.cancel()

    async def _drain(self) -> None:
        """On shutdown: let a running session finish (bounded), then end the stream cleanly."""
        session = self._session
        if session is not None:
            with anyio.move_on_after(self._s.shutdown_grace):
                await session.closed.wait()
            if not session.closed.is_set():
                session.request_local_stop("commander shut down before the session finished")
                with anyio.move_on_after(self._s.stop_cancel_timeout + LOCAL_STOP_SLACK):
                    await session.closed.wait()
        stream = self._stream.current
        if stream is not None and self._session is None:
            # Half-close: the dispatcher sees a clean end of the slot, not a cancel,
            # and answers with its end of stream, on which the reader leaves.
            with anyio.move_on_after(DRAIN_EOF_TIMEOUT):
                await stream.writer.half_close()
                await stream.closed.wait()

    # --- the stream's parts ---

    def _open(self, channel: grpc.aio.Channel) -> Any:
        stub = interaction_pb2_grpc.AgentInteractionStub(channel)
        return open_stream(stub.ChatStream, self._s.connection)

    async def _handshake(self, stream: SlotStream) -> None:
        session, upstream = self._session, self._upstream
        await stream.writer.write(self._hello_packet(session, upstream))
        try:
            first = await stream.read_first()
        except grpc.aio.AioRpcError as exc:
            if session is not None and _refused_for_now(exc):
                # Not decided: try again, less often each time (reconnect_forever).
                raise RefusedForNow(describe_error(exc, "")) from exc
            raise
        if first.WhichOneof("signal") != "ack" or first.ack.kind != ipb.ACK_KIND_HELLO:
            raise StreamEnded(f"expected ack HELLO, got {first.WhichOneof('signal') or 'nothing'}")
        self.slot_id = first.ack.slot_id
        if first.ack.max_upstream_batch > 1:
            # This dispatcher takes UpstreamBatch: what waits for the writer goes
            # out as one message (a resend after a re-attach too).
            stream.writer.enable_batches(first.ack.max_upstream_batch, _batch, _size)
        if session is not None and upstream is not None:
            if first.session_id == session.session_id and upstream.abandoned is not None:
                # Given up while the hello was on its way: end the stream, so that
                # this dispatcher does not keep a busy slot for the session until
                # the task's timeout (its task fails when its window passes).
                raise StreamEnded(
                    f"the dispatcher took session {session.session_id} back after the slot "
                    "had given it up; ending the stream so that it lets the session go"
                )
            if first.session_id == session.session_id:
                stream.tg.start_soon(self._resume, session, upstream, stream, first.ack)
            else:
                self._give_up(session, upstream, first.ack.detail or "re-attach refused")
        self._set_connected(True)
        _log.info(
            "%s connected to %s (slot_id=%s%s)",
            self._name,
            self._stream.target,
            self.slot_id or "-",
            f", re-attaching session {session.session_id}" if session is not None else "",
        )

    async def _resume(
        self, session: Session, upstream: Upstream, stream: SlotStream, ack: ipb.Ack
    ) -> None:
        """The dispatcher took the session back: resend what it lacks, then go on."""
        away = time.monotonic() - (upstream.detached_at or time.monotonic())
        before = upstream.pending
        resent = await upstream.attach(
            stream.writer.send, ack.upstream_seq, stream.writer.send_nowait, stream.writer.take_fold
        )
        if not upstream.attached:
            return  # the new stream broke meanwhile; the next one tries again
        session.reattached(ack.upstream_seq, ack.attempt)
        _log.info(
            "session %s of task %s re-attached after %.3fs (attempt %d): the dispatcher had "
            "recorded up to seq %d; %d of %d kept packets written again",
            session.session_id,
            session.task_id,
            away,
            ack.attempt,
            ack.upstream_seq,
            resent,
            before,
        )

    def _give_up(self, session: Session, upstream: Upstream, why: str) -> None:
        """No dispatcher takes the session back: end it here (nothing more is sent)."""
        if self._session is session:
            self._session, self._upstream = None, None
        if session.terminal_sent.is_set():
            # Its end went out before the hand-over; the dispatcher says what came of it.
            _log.info("session %s had ended: %s", session.session_id, why)
            session.closed.set()
            return
        upstream.abandon(why)

    def _on_closed(self) -> None:
        """The stream is gone: the session goes on and waits to re-attach (or, without
        hand-over, is abandoned with it)."""
        self._set_connected(False)
        session = self._session
        if session is not None and self.handover and self._upstream is not None:
            if not session.closed.is_set():
                first = session.attached  # not yet waiting to re-attach
                self._upstream.detach()
                session.detached()
                if first and self._tg is not None:
                    self._tg.start_soon(self._watch_detached, session, self._upstream)
                return
        self._session, self._upstream = None, None
        if session is not None:
            session.closed.set()
        self._abandoned = session

    async def _watch_detached(self, session: Session, upstream: Upstream) -> None:
        """Abandon the session if no dispatcher takes it back in time."""
        with anyio.move_on_after(self._s.handover_timeout):
            await session.wait_attached()
            return
        if not upstream.attached and not session.closed.is_set():
            self._give_up(
                session,
                upstream,
                f"no dispatcher took the session back within {self._s.handover_timeout:g}s "
                "(--handover-timeout)",
            )

    def _report_lost(self, reason: str) -> None:
        if self._session is not None and self._upstream is not None:
            _log.warning(
                "%s: stream lost (%s); session %s of task %s goes on and re-attaches "
                "(%d packets not yet recorded)",
                self._name,
                reason,
                self._session.session_id,
                self._session.task_id,
                self._upstream.pending,
            )
            return
        session, self._abandoned = self._abandoned, None
        if session is not None and not session.terminal_sent.is_set():
            _log.warning(
                "%s: stream lost (%s); session %s of task %s abandoned",
                self._name,
                reason,
                session.session_id,
                session.task_id,
            )
        elif not self._s.draining.is_set():
            _log.warning("%s: stream lost (%s); reconnecting", self._name, reason)

    async def _send_quietly(
        self, writer: StreamWriter[ipb.UpstreamPacket], packet: ipb.UpstreamPacket
    ) -> None:
        try:
            await writer.send(Outgoing(packet))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _hello_packet(
        self, session: Session | None = None, upstream: Upstream | None = None
    ) -> ipb.UpstreamPacket:
        hello = ipb.Hello()
        hello.CopyFrom(self._s.hello)
        hello.slot_index = self.index
        if session is not None and upstream is not None:
            hello.reattach.CopyFrom(
                ipb.Reattach(
                    task_id=session.task_id,
                    session_id=session.session_id,
                    attempt=session.attempt,
                    acked_seq=upstream.acked,
                )
            )
        return ipb.UpstreamPacket(timestamp=now_us(), hello=hello)

    def _accept(self, packet: ipb.UpstreamPacket) -> bool:
        """Writer gate: nothing of a session is written after its terminal packet
        (a packet resent after a hand-over, numbered up to the terminal one, is)."""
        if packet.session_id in self._fenced and packet.WhichOneof("payload") in _FENCED:
            return False  # the dispatcher stopped the session: it would drop this
        ended = self._ended.get(packet.session_id)
        if ended is not None and not (0 < packet.seq <= ended):
            _log.debug(
                "%s: dropped %s of session %s after its terminal packet",
                self._name,
                packet.WhichOneof("payload"),
                packet.session_id,
            )
            return False
        if packet.WhichOneof("payload") in _TERMINAL and ended is None:
            self._ended[packet.session_id] = packet.seq
            while len(self._ended) > 8:
                self._ended.popitem(last=False)
        return True

    def _fence(self, session_id: str, stream: SlotStream) -> None:
        """The dispatcher stopped the session: from now on its fenced output is
        not written (the gate), and what of it waits in the writer's queue is
        dropped at once, so the ``stopped`` waits only for the write under way.

        The dispatcher decided the stop before we read it, so it drops every
        such packet we have not written yet anyway (a dropped packet's seq is
        acknowledged with the ``stopped``'s; the dispatcher allows the gap).
        """
        self._fenced[session_id] = None
        while len(self._fenced) > 8:
            self._fenced.popitem(last=False)

        def fenced(packet: ipb.UpstreamPacket) -> bool:
            return packet.session_id == session_id and packet.WhichOneof("payload") in _FENCED

        stream.writer.discard(fenced)

    # --- the reader ---

    async def _read_loop(self, stream: SlotStream) -> None:
        """Dispatch downstream packets. Never blocks on anything but ``call.read()``."""
        while True:
            packet = await stream.read()
            kind = packet.WhichOneof("signal")
            session = self._session
            current = session is not None and packet.session_id == session.session_id
            if kind == "start":
                self._on_start(packet, stream)
            elif kind == "stop":
                if session is not None and current:
                    _log.info(
                        "session %s: stop (%s, %s)",
                        packet.session_id,
                        stop_code_name(packet.stop.code),
                        packet.stop.reason,
                    )
                    self._fence(packet.session_id, stream)
                    session.request_stop(packet.stop)
                else:
                    _log.debug("%s: stop for unknown session %s", self._name, packet.session_id)
            elif kind == "tool_result":
                if (
                    session is None
                    or not current
                    or not session.deliver_tool_result(packet.tool_result)
                ):
                    _log.debug(
                        "%s: tool_result %s not awaited (late or unknown)",
                        self._name,
                        packet.tool_result.call_id,
                    )
            elif kind == "user_input":
                if session is not None and current:
                    if not session.deliver_user_input(packet.user_input):
                        _log.warning(
                            "session %s: user input %s dropped (backlog full)",
                            session.session_id,
                            packet.user_input.message_id,
                        )
                else:
                    _log.debug("%s: user_input for unknown session", self._name)
            elif kind == "ack":
                self._on_ack(packet)
            elif kind == "move":
                self._on_move(packet, stream)
            else:
                _log.warning("%s: ignoring a downstream packet with no signal", self._name)

    def _on_start(self, packet: ipb.DownstreamPacket, stream: SlotStream) -> None:
        if self._session is not None:
            # The dispatcher must not start a second session on a busy slot; fail
            # the newcomer rather than lose it silently.
            _log.error(
                "%s: start of session %s while session %s runs; refusing it",
                self._name,
                packet.session_id,
                self._session.session_id,
            )
            refusal = ipb.UpstreamPacket(
                session_id=packet.session_id,
                timestamp=now_us(),
                result=ipb.FinalResult(
                    outcome=ipb.SESSION_OUTCOME_FAILURE,
                    message="commander slot is busy with another session",
                ),
            )
            stream.tg.start_soon(self._send_quietly, stream.writer, refusal)
            return
        name = packet.start.planner or "chat"
        upstream = Upstream(
            packet.session_id, limit=self._s.handover_buffer, window=self._s.content_window
        )
        session = Session(
            packet,
            self._s.resolve_planner(name),
            upstream.send,
            slot_index=self.index,
            cancel_timeout=self._s.stop_cancel_timeout,
            closed_timeout=self._s.closed_timeout,
            fold=upstream.fold_content,
        )
        upstream.on_abandon(session.abandon)
        self._session, self._upstream = session, upstream
        # The session runs in the slot's task group: it outlives this stream
        # (hand-over); without hand-over, _on_closed ends it with the stream.
        tg = self._tg if self.handover and self._tg is not None else stream.tg
        upstream.attach_new(stream.writer.send, stream.writer.send_nowait, stream.writer.take_fold)
        tg.start_soon(self._run_session, session, upstream, tg)

    async def _run_session(self, session: Session, upstream: Upstream, tg: TaskGroup) -> None:
        try:
            await session.run(tg)
        except Exception:
            _log.exception("session %s: coordinator failed", session.session_id)
            self._stream.abort()
        finally:
            if self._session is session:
                self._session, self._upstream = None, None

    def _on_move(self, packet: ipb.DownstreamPacket, stream: SlotStream) -> None:
        """The dispatcher drains: leave it (half-close) and re-attach elsewhere."""
        _log.info(
            "%s: the dispatcher asks us to move (%s)%s",
            self._name,
            packet.move.reason or "-",
            f"; session {self._session.session_id} will re-attach" if self._session else "",
        )
        if self._upstream is not None and self.handover:
            self._upstream.detach()  # nothing more of the session on this stream
        stream.tg.start_soon(self._leave, stream)

    async def _leave(self, stream: SlotStream) -> None:
        try:
            await stream.writer.half_close()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _on_ack(self, packet: ipb.DownstreamPacket) -> None:
        ack = packet.ack
        session = self._session
        if ack.kind == ipb.ACK_KIND_RECORDED:
            upstream = self._upstream
            if upstream is not None and packet.session_id == upstream.session_id:
                upstream.on_ack(ack.upstream_seq)
        elif ack.kind == ipb.ACK_KIND_SESSION_CLOSED:
            if session is not None and packet.session_id == session.session_id:
                session.closed.set()
                self._session, self._upstream = None, None
            else:
                _log.debug("%s: SESSION_CLOSED for %s", self._name, packet.session_id)
        elif ack.kind == ipb.ACK_KIND_REJECTED:
            _log.warning(
                "%s: dispatcher rejected a packet of session %s: %s",
                self._name,
                packet.session_id or "-",
                ack.detail,
            )
        else:
            _log.warning("%s: unexpected ack %s", self._name, ack.kind)
