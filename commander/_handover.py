"""A session's upstream across dispatchers: numbered packets, kept until recorded.

Session hand-over (docs/protocol.md, "Session hand-over"): every packet a
session writes gets the next ``seq`` (1, 2, 3…) and stays in the session's
:class:`Upstream` until the dispatcher acknowledges it (``ack{RECORDED,
upstream_seq}``, cumulative). When the stream is lost the session goes on;
its packets wait in the buffer, bounded by ``limit``, and once the slot has
re-attached the session on a new stream, exactly the packets the new
dispatcher has not recorded are written again, in order, before any new one.

Packets of one session reach the stream's writer in ``seq`` order: numbering
and handing over happen under one lock. This module knows packets only as
``UpstreamPacket`` and the writer only as its ``send``; it must not touch the
gRPC call or the session's planner.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable

import anyio

from commander._errors import CommanderError
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._writer import Outgoing

#: The writer's ``send`` of the stream the session is attached to.
WriterSend = Callable[[Outgoing[ipb.UpstreamPacket]], Awaitable[None]]


class SessionAbandoned(CommanderError):
    """The session cannot go on: its dispatcher is gone for too long, or too
    much of its output waits unrecorded (the task ends FAILURE on the
    dispatcher's side once its hand-over window has passed)."""

    code = "session_abandoned"


class Upstream:
    """One session's upstream packets, numbered and kept until recorded (internal)."""

    def __init__(self, session_id: str, *, limit: int) -> None:
        self.session_id = session_id
        self.limit = max(1, limit)
        self._seq = 0
        self._unacked: collections.deque[ipb.UpstreamPacket] = collections.deque()
        #: The highest seq the dispatcher acknowledged.
        self.acked = 0
        self._lock = anyio.Lock()
        self._writer: WriterSend | None = None
        self._changed = anyio.Event()
        #: Why the session was abandoned, once it was.
        self.abandoned: str | None = None
        #: When the current stream was lost (monotonic), None while attached.
        self.detached_at: float | None = None
        self._on_abandon: Callable[[str], None] | None = None

    # --- state ---

    @property
    def attached(self) -> bool:
        return self._writer is not None

    @property
    def pending(self) -> int:
        """Packets written (or to write) that the dispatcher has not acknowledged."""
        return len(self._unacked)

    @property
    def last_seq(self) -> int:
        return self._seq

    def on_abandon(self, callback: Callable[[str], None]) -> None:
        self._on_abandon = callback

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    # --- the session's side ---

    async def send(self, out: Outgoing[ipb.UpstreamPacket]) -> None:
        """Number ``out``'s packet, keep it, and write it if attached.

        Returns once the packet is kept (and, attached, taken by the writer):
        from then on it reaches a dispatcher unless the session is abandoned.
        Raises :class:`SessionAbandoned` when the session cannot go on.
        """
        packet = out.message
        assert packet is not None
        async with self._lock:
            while len(self._unacked) >= self.limit:
                if self.abandoned is not None:
                    break
                if self._writer is None:
                    self.abandon(
                        f"{len(self._unacked)} packets wait unrecorded while the dispatcher "
                        f"is away, the limit is {self.limit} (--handover-buffer)"
                    )
                    break
                await self._changed.wait()  # an ack frees room
            if self.abandoned is not None:
                raise SessionAbandoned(f"session abandoned: {self.abandoned}")
            self._seq += 1
            packet.seq = self._seq
            self._unacked.append(packet)
            writer = self._writer
            if writer is None:
                out.taken = True  # kept: it goes out after the re-attach
                return
            inner = Outgoing(packet)
            try:
                await writer(inner)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the stream is gone: kept for the re-attach
            except BaseException:
                if not inner.taken:
                    # Cancelled before the writer took it: as if never sent,
                    # so that no later packet overtakes it.
                    self._unacked.pop()
                    self._seq -= 1
                    raise
                out.taken = True
                raise
            out.taken = True

    # --- the slot's side ---

    def on_ack(self, upstream_seq: int) -> None:
        """The dispatcher recorded every packet up to ``upstream_seq`` (cumulative)."""
        if upstream_seq <= self.acked:
            return
        self.acked = upstream_seq
        while self._unacked and self._unacked[0].seq <= upstream_seq:
            self._unacked.popleft()
        self._notify()

    def detach(self) -> None:
        """The stream is lost (or the dispatcher asked us to move): keep what comes."""
        if self._writer is not None:
            self._writer = None
            self.detached_at = time.monotonic()
        self._notify()

    def attach_new(self, writer: WriterSend) -> None:
        """Start on the stream that started the session (nothing is kept yet)."""
        self._writer = writer

    async def attach(self, writer: WriterSend, recorded: int) -> int:
        """Continue on a new stream whose dispatcher recorded up to ``recorded``.

        Writes the packets after it, in order, before any new packet; returns
        how many it wrote again. A stream that breaks meanwhile leaves them
        kept for the next attempt.
        """
        self.on_ack(recorded)
        async with self._lock:
            resent = 0
            try:
                for packet in list(self._unacked):
                    await writer(Outgoing(packet))
                    resent += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return resent
            self._writer = writer
            self.detached_at = None
            self._notify()
            return resent

    def abandon(self, reason: str) -> None:
        """Give the session up (nothing more is sent); the session is told once."""
        if self.abandoned is not None:
            return
        self.abandoned = reason
        self._writer = None
        self._notify()
        if self._on_abandon is not None:
            self._on_abandon(reason)
