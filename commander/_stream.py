"""The life of one long-lived stream to the dispatcher, shared by slots and tool providers.

Open the stream → handshake → serve; when it fails, back off and open it
again (:func:`~commander._connection.reconnect_forever`); on shutdown, drain
and abort. A slot (``AgentInteraction.ChatStream``) and a tool provider
(``ToolProviderService.Connect``) differ only in the parts they pass to
:class:`ReconnectingStream`: what opens the RPC, the handshake, and the read
loop that serves it.

Per attempt there are exactly two long-lived tasks that touch the gRPC call:
the reader (the ``serve`` part, the only ``call.read()``) and the writer
(:class:`~commander._writer.StreamWriter`, the only ``call.write()``).
Neither is cancelled while the stream lives: a stream is torn down by
``call.cancel()`` first (which ends a pending read or write, see
:class:`~commander._connection.CallTimer`), then by cancelling its task group.

This module owns the stream's lifecycle and nothing of what flows on it: it
must not know packets, sessions or invocations.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import grpc
import grpc.aio
from anyio.abc import TaskGroup

from commander._connection import (
    CallCancelled,
    CallTimer,
    ConnectFailed,
    ConnectionConfig,
    call_op,
    close_channel,
    describe_error,
    reconnect_forever,
)
from commander._errors import CommanderError
from commander._writer import StreamWriter

_log = logging.getLogger("commander.stream")

Up = TypeVar("Up")
Down = TypeVar("Down")


class StreamEnded(Exception):
    """The dispatcher ended the stream, or broke its protocol (an expected end; internal)."""


class RefusedForNow(StreamEnded):
    """The dispatcher refused the handshake for now, "try again" (the handshake part
    raises it): a failed attempt after which the next ones back off more (internal)."""


#: Ends of a stream that are part of life (logged as a line, not a traceback).
_EXPECTED = (StreamEnded, grpc.aio.AioRpcError, CallCancelled, TimeoutError, CommanderError)


class Stream(Generic[Up, Down]):
    """One open stream, as the handshake and serve parts see it."""

    def __init__(
        self,
        call: Any,
        writer: StreamWriter[Up],
        tg: TaskGroup,
        receive: type[Down],
        handshake_timeout: float,
    ) -> None:
        #: The grpc.aio call (typed loosely: grpc's stubs lag the aio API).
        self.call = call
        #: The stream's single writer.
        self.writer = writer
        #: The stream's task group: what runs in it ends with the stream.
        self.tg = tg
        #: Set once the stream is torn down (its tasks are gone).
        self.closed = anyio.Event()
        self._receive = receive
        self._handshake_timeout = handshake_timeout

    async def read(self) -> Down:
        """The next message; :class:`StreamEnded` at the dispatcher's end of stream."""
        message = await call_op(self.call.read())
        if not isinstance(message, self._receive):  # grpc.aio.EOF
            raise StreamEnded("the dispatcher ended the stream")
        return message

    async def read_first(self) -> Down:
        """The answer to the hello, within the connection's handshake timeout.

        Raises :class:`TimeoutError` when the time ran out (the call is cancelled).
        """
        timer = CallTimer(self.call, self._handshake_timeout)
        await self.tg.start(timer.run)
        try:
            return await self.read()
        except Exception:
            if timer.expired:
                raise TimeoutError from None
            raise
        finally:
            timer.disarm()


class ReconnectingStream(Generic[Up, Down]):
    """A stream kept open until shutdown: one attempt after another, with backoff.

    Args:
        connection: where the dispatcher is; its backoff and handshake timeout.
        name: for logs (``slot 0``, ``provider text-tools``).
        open_call: starts the RPC on a fresh channel (e.g. ``stub.ChatStream``
            with the connection's metadata).
        receive: the type of the dispatcher's messages (anything else is its
            end of stream).
        handshake: sends the hello and checks the answer
            (:meth:`Stream.read_first`); raises if the stream is not welcome.
            Once it returns, the stream is healthy.
        serve: the read loop; returns or raises when the stream ends.
        gate: the writer's gate (see :class:`~commander._writer.StreamWriter`).
        on_closed: called once per attempt when the stream is torn down,
            before its channel is closed (clears what the handshake set up).
        on_lost: called with the reason when a healthy stream has ended and
            the attempt returned (not when it was cancelled).
        no_answer: the reason logged when the handshake times out.
        urgent: while it returns true, reconnect attempts keep the shortest
            backoff, growing only after refusals for now (:class:`RefusedForNow`;
            see :func:`~commander._connection.reconnect_forever`).
    """

    def __init__(
        self,
        connection: ConnectionConfig,
        *,
        name: str,
        open_call: Callable[[grpc.aio.Channel], Any],
        receive: type[Down],
        handshake: Callable[[Stream[Up, Down]], Awaitable[None]],
        serve: Callable[[Stream[Up, Down]], Awaitable[None]],
        gate: Callable[[Up], bool] | None = None,
        on_closed: Callable[[], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        no_answer: str = "no answer to the hello in time",
        urgent: Callable[[], bool] | None = None,
    ) -> None:
        self.connection = connection
        self.name = name
        self._open_call = open_call
        self._receive = receive
        self._handshake = handshake
        self._serve = serve
        self._gate = gate
        self._on_closed = on_closed
        self._on_lost = on_lost
        self._no_answer = no_answer
        self._urgent = urgent
        self._stream: Stream[Up, Down] | None = None
        self._healthy: Stream[Up, Down] | None = None
        # Which of the connection's addresses the next attempt dials: the
        # next one after each attempt (a dispatcher that is gone, or drains,
        # is left for the next; one name may also resolve to several).
        self._target_index = 0
        self._draining = anyio.Event()

    @property
    def target(self) -> str:
        """The address the current (or next) attempt dials."""
        targets = self.connection.targets
        return targets[self._target_index % len(targets)]

    @property
    def current(self) -> Stream[Up, Down] | None:
        """The stream while it is healthy (its handshake done), else None."""
        return self._healthy

    async def run(
        self, draining: anyio.Event, drain: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Keep the stream open until ``draining`` is set.

        Then ``drain()`` runs (it must bound itself), the current stream is
        aborted and ``run`` returns.
        """
        self._draining = draining
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_drain, draining, drain, tg.cancel_scope)
            await reconnect_forever(
                self.connection,
                self._attempt,
                name=self.name,
                should_stop=draining.is_set,
                urgent=self._urgent,
            )
            tg.cancel_scope.cancel()

    async def _watch_drain(
        self,
        draining: anyio.Event,
        drain: Callable[[], Awaitable[None]] | None,
        scope: anyio.CancelScope,
    ) -> None:
        await draining.wait()
        if drain is not None:
            await drain()
        self.abort()
        scope.cancel()

    def abort(self) -> None:
        """End the current stream now: cancel the RPC, then the stream's task group."""
        stream = self._stream
        if stream is not None:
            stream.call.cancel()
            stream.tg.cancel_scope.cancel()

    async def _attempt(self) -> bool:
        """One stream: :class:`ConnectFailed` if it never got healthy, else ``True`` at its end."""
        if self._draining.is_set():
            return True  # no new stream while shutting down
        channel = self.connection.create_channel(self.target)
        broken: list[str] = []
        healthy = refused_for_now = False
        writer: StreamWriter[Up] | None = None
        stream: Stream[Up, Down] | None = None
        try:
            call = self._open_call(channel)
            writer = StreamWriter(
                lambda message: call_op(call.write(message)),
                lambda: call_op(call.done_writing()),
                self._gate,
            )
            # Every task in this group handles its own errors (recording why the
            # stream broke) so that nothing arrives wrapped in an ExceptionGroup.
            async with anyio.create_task_group() as tg:
                stream = self._stream = Stream(
                    call, writer, tg, self._receive, self.connection.handshake_timeout
                )
                tg.start_soon(self._guard, writer.run, "writer", broken)
                try:
                    await self._handshake(stream)
                    healthy = True
                    self._healthy = stream
                    await self._serve(stream)
                except Exception as exc:
                    if not isinstance(exc, _EXPECTED):
                        _log.exception("%s: unexpected error on the stream", self.name)
                    broken.append(describe_error(exc, self._no_answer))
                    refused_for_now = isinstance(exc, RefusedForNow)
                self.abort()
        finally:
            self._stream = None
            self._healthy = None
            if self._on_closed is not None:
                self._on_closed()
            if writer is not None:
                writer.close()
            await close_channel(channel)
            if stream is not None:
                stream.closed.set()
            self._target_index += 1
        reason = broken[0] if broken else "stream ended"
        if not healthy:
            raise ConnectFailed(reason, refused_for_now=refused_for_now)
        if self._on_lost is not None:
            self._on_lost(reason)
        return True

    async def _guard(self, fn: Callable[[], Awaitable[None]], what: str, broken: list[str]) -> None:
        """Run a stream task; its failure ends the stream (not the commander)."""
        try:
            await fn()
        except Exception as exc:
            broken.append(f"{what}: {describe_error(exc, 'timed out')}")
            self.abort()
