"""One slot: a ChatStream to the dispatcher that runs one session at a time.

Per connection attempt there are exactly two long-lived tasks that touch the
gRPC call: the reader (this module's read loop, the only ``call.read()``) and
the writer (:class:`~commander._writer.StreamWriter`, the only
``call.write()``). Neither is ever cancelled because of a stop — only when the
whole stream is torn down, and then by ``call.cancel()`` first. Sessions and
planners run beside them in the same task group and talk to the reader through
events, to the writer through its rendezvous channel.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import anyio
import grpc
import grpc.aio
from anyio.abc import TaskGroup

from commander import _metrics
from commander._connection import (
    CallCancelled,
    CallTimer,
    ConnectFailed,
    ConnectionConfig,
    call_op,
    close_channel,
    describe_error,
    now_us,
    open_stream,
    reconnect_forever,
)
from commander._context import Planner
from commander._errors import CommanderError, stop_code_name
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import interaction_pb2_grpc
from commander._session import Session
from commander._writer import Outgoing, StreamWriter

_log = logging.getLogger("commander.slot")

_TERMINAL = frozenset({"result", "stopped"})


class _StreamBroken(Exception):
    """The ChatStream ended or failed (internal)."""


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
    ) -> None:
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
        self._writer: StreamWriter[ipb.UpstreamPacket] | None = None
        self._ended: collections.deque[str] = collections.deque(maxlen=8)
        self._stream_scope: anyio.CancelScope | None = None
        self._call: Any = None
        self.slot_id = ""
        self._healthy = False
        #: Whether the hello is acknowledged on the current stream.
        self.connected = False
        self._connection_changed = anyio.Event()

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

    async def run(self) -> None:
        """Serve until the commander drains; reconnect whenever the stream breaks."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_drain, tg.cancel_scope)
            await reconnect_forever(
                self._s.connection,
                self._attempt,
                name=self._name,
                should_stop=self._s.draining.is_set,
            )
            tg.cancel_scope.cancel()

    async def _watch_drain(self, slot_scope: anyio.CancelScope) -> None:
        """On shutdown: let a running session finish (bounded), then leave."""
        await self._s.draining.wait()
        session = self._session
        if session is not None:
            with anyio.move_on_after(self._s.shutdown_grace):
                await session.closed.wait()
            if not session.closed.is_set():
                session.request_local_stop("commander shut down before the session finished")
                with anyio.move_on_after(self._s.stop_cancel_timeout + 5.0):
                    await session.closed.wait()
        writer = self._writer
        if writer is not None and self._session is None:
            # Half-close: the dispatcher sees a clean end of the slot, not a cancel.
            with anyio.move_on_after(2.0):
                await writer.half_close()
                await anyio.sleep(1.0)  # the reader leaves on the dispatcher's EOF
        self._abort()
        slot_scope.cancel()

    # --- one connection attempt ---

    async def _attempt(self) -> bool:
        """One ChatStream: raise ConnectFailed before hello is acked, else return on its end."""
        if self._s.draining.is_set():
            return True
        channel = self._s.connection.create_channel()
        self._healthy = False
        broken: list[str] = []
        writer: StreamWriter[ipb.UpstreamPacket] | None = None
        try:
            stub = interaction_pb2_grpc.AgentInteractionStub(channel)
            call = self._call = open_stream(stub.ChatStream, self._s.connection)
            writer = StreamWriter(
                lambda packet: call_op(call.write(packet)),
                lambda: call_op(call.done_writing()),
                self._accept,
            )
            # Every task in this group handles its own errors (recording why the
            # stream broke) so that nothing arrives wrapped in an ExceptionGroup.
            async with anyio.create_task_group() as tg:
                self._stream_scope = tg.cancel_scope
                tg.start_soon(self._guard, writer.run, "writer", broken, tg)
                try:
                    await self._handshake(call, writer, tg)
                    await self._read_loop(call, tg, writer)
                except Exception as exc:
                    if not isinstance(
                        exc,
                        _StreamBroken
                        | grpc.aio.AioRpcError
                        | CallCancelled
                        | TimeoutError
                        | CommanderError,
                    ):
                        _log.exception("%s: unexpected error on the stream", self._name)
                    broken.append(describe_error(exc, "no answer to hello in time"))
                self._abort()
        finally:
            self._writer = None
            self._stream_scope = None
            self._call = None
            self._set_connected(False)
            if writer is not None:
                writer.close()
            await close_channel(channel)
            session, self._session = self._session, None
            if session is not None:
                session.closed.set()  # abandoned with the stream
        reason = broken[0] if broken else "stream ended"
        if not self._healthy:
            raise ConnectFailed(reason)
        self._report_lost(reason, session)
        return True

    def _abort(self) -> None:
        """End the current stream now: cancel the RPC (which ends any pending read
        or write, see CallTimer) and the stream's task group."""
        if self._call is not None:
            self._call.cancel()
        if self._stream_scope is not None:
            self._stream_scope.cancel()

    async def _handshake(
        self, call: Any, writer: StreamWriter[ipb.UpstreamPacket], tg: TaskGroup
    ) -> None:
        await writer.write(self._hello_packet())
        timer = CallTimer(call, self._s.connection.handshake_timeout)
        await tg.start(timer.run)
        try:
            first = await self._read(call)
        except Exception:
            if timer.expired:
                raise TimeoutError from None
            raise
        finally:
            timer.disarm()
        if first.WhichOneof("signal") != "ack" or first.ack.kind != ipb.ACK_KIND_HELLO:
            raise _StreamBroken(
                f"expected ack HELLO, got {first.WhichOneof('signal') or 'nothing'}"
            )
        self._healthy = True
        self.slot_id = first.ack.slot_id
        self._writer = writer
        self._set_connected(True)
        _log.info(
            "%s connected to %s (slot_id=%s)",
            self._name,
            self._s.connection.target,
            self.slot_id or "-",
        )

    def _report_lost(self, reason: str, session: Session | None) -> None:
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

    async def _guard(
        self,
        fn: Callable[[], Any],
        what: str,
        broken: list[str],
        tg: TaskGroup,
    ) -> None:
        """Run a stream task; its failure ends the stream (not the commander)."""
        try:
            await fn()
        except Exception as exc:
            broken.append(f"{what}: {describe_error(exc, 'timed out')}")
            self._abort()

    async def _send_quietly(
        self, writer: StreamWriter[ipb.UpstreamPacket], packet: ipb.UpstreamPacket
    ) -> None:
        try:
            await writer.send(Outgoing(packet))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def _read(self, call: Any) -> ipb.DownstreamPacket:
        packet = await call_op(call.read())
        if not isinstance(packet, ipb.DownstreamPacket):  # grpc.aio.EOF
            raise _StreamBroken("the dispatcher ended the stream")
        return packet

    def _hello_packet(self) -> ipb.UpstreamPacket:
        hello = ipb.Hello()
        hello.CopyFrom(self._s.hello)
        hello.slot_index = self.index
        return ipb.UpstreamPacket(timestamp=now_us(), hello=hello)

    def _accept(self, packet: ipb.UpstreamPacket) -> bool:
        """Writer gate: nothing of a session is written after its terminal packet."""
        if packet.session_id in self._ended:
            _log.debug(
                "%s: dropped %s of session %s after its terminal packet",
                self._name,
                packet.WhichOneof("payload"),
                packet.session_id,
            )
            return False
        if packet.WhichOneof("payload") in _TERMINAL:
            self._ended.append(packet.session_id)
        return True

    # --- the reader ---

    async def _read_loop(
        self, call: Any, tg: TaskGroup, writer: StreamWriter[ipb.UpstreamPacket]
    ) -> None:
        """Dispatch downstream packets. Never blocks on anything but ``call.read()``."""
        while True:
            packet = await self._read(call)
            kind = packet.WhichOneof("signal")
            session = self._session
            current = session is not None and packet.session_id == session.session_id
            if kind == "start":
                self._on_start(packet, tg, writer)
            elif kind == "stop":
                if session is not None and current:
                    _log.info(
                        "session %s: stop (%s, %s)",
                        packet.session_id,
                        stop_code_name(packet.stop.code),
                        packet.stop.reason,
                    )
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
            else:
                _log.warning("%s: ignoring a downstream packet with no signal", self._name)

    def _on_start(
        self,
        packet: ipb.DownstreamPacket,
        tg: TaskGroup,
        writer: StreamWriter[ipb.UpstreamPacket],
    ) -> None:
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
            tg.start_soon(self._send_quietly, writer, refusal)
            return
        name = packet.start.planner or "chat"
        session = Session(
            packet,
            self._s.resolve_planner(name),
            writer.send,
            slot_index=self.index,
            cancel_timeout=self._s.stop_cancel_timeout,
            closed_timeout=self._s.closed_timeout,
        )
        self._session = session
        tg.start_soon(self._run_session, session, tg)

    async def _run_session(self, session: Session, tg: TaskGroup) -> None:
        try:
            await session.run(tg)
        except Exception:
            _log.exception("session %s: coordinator failed", session.session_id)
            self._abort()
        finally:
            if self._session is session:
                self._session = None

    def _on_ack(self, packet: ipb.DownstreamPacket) -> None:
        ack = packet.ack
        session = self._session
        if ack.kind == ipb.ACK_KIND_SESSION_CLOSED:
            if session is not None and packet.session_id == session.session_id:
                session.closed.set()
                self._session = None
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
