"""A session's upstream across dispatchers: numbered packets, kept until recorded.

Session hand-over (docs/protocol.md, "Session hand-over"): every packet a
session writes gets the next ``seq`` (1, 2, 3…) and stays in the session's
:class:`Upstream` until the dispatcher acknowledges it (``ack{RECORDED,
upstream_seq}``, cumulative). When the stream is lost the session goes on;
its packets wait in the buffer, bounded by ``limit``, and once the slot has
re-attached the session on a new stream, exactly the packets the new
dispatcher has not recorded are written again, in order, before any new one.

Packets of one session reach the stream's writer in ``seq`` order: numbering
and handing over happen under one lock. A content chunk handed over while the
session's previous packet, content too, still waits in the writer's queue is
folded into that packet (:data:`COALESCE_CHARS` at most, never past an
answer's ``is_finish``) and gets no seq of its own: the folded packet is the
one kept here, so what is resent after a hand-over is exactly what was
numbered. A lone chunk is never held back: it is written as soon as the
writer is free.

The credit window (``window``, ``--content-window``): a content packet that
needs a seq of its own waits while ``window`` packets, or
:data:`WINDOW_CHARS` characters of content, of the session are
unacknowledged on the stream. It does not make the planner wait: it is
numbered, kept and *held* (not handed to the writer), later chunks fold into
it, and the ack that gives credit hands it over (``StreamWriter.send_nowait``);
only when the held packet is full does the planner wait. (Without a
``nowait``, e.g. in tests, the planner waits instead, folding only into a
packet still in the writer's queue.) Only once the
dispatcher has acknowledged anything: one that never does gets no window.
Other packets (``stopped``, ``result``, ``usage``, tool calls, errors) never
wait for credit and, numbered under the same lock, never overtake content
(a held packet is handed over first). So a ``stopped`` queues behind at most
that much of the session's content, plus the held packet, instead of the
stream's whole HTTP/2 window. Memory: at most ``limit`` packets kept per
session; attached, at most ``window`` + 1 (held) content packets and
:data:`WINDOW_CHARS` + twice :data:`COALESCE_CHARS` characters of content, plus
control packets. This module knows packets only as
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


#: Content chunks are folded into one packet up to this many characters of text
#: (at most 4 bytes each: far below the message size limit).
COALESCE_CHARS = 4 * 1024


#: With a credit window, content also waits while this many characters of the
#: session's content are unacknowledged: folded packets are up to
#: COALESCE_CHARS each, so a window of packets alone would let a flood put
#: far more bytes ahead of a ``stopped`` than a window of small packets.
#: This bounds how much content a ``stopped`` can queue behind (the stop-flood
#: goal), so it is not raised for throughput: 16 Ki let 8 flooding sessions
#: double the stop's decision → ``stopped``. The dispatcher acks once 6 KiB of
#: content text are stored, besides its 20 ms tick, so the window does not
#: pace a flood (with the tick alone: WINDOW_CHARS per 20 ms).
WINDOW_CHARS = 8 * 1024


def _merge_content(into: ipb.UpstreamPacket, packet: ipb.UpstreamPacket) -> bool:
    """Append ``packet``'s chunk to ``into``'s (``into`` keeps its seq and timestamp)."""
    into.content.text += packet.content.text
    into.content.is_finish = packet.content.is_finish
    return True


class Upstream:
    """One session's upstream packets, numbered and kept until recorded (internal)."""

    def __init__(self, session_id: str, *, limit: int, window: int = 0) -> None:
        self.session_id = session_id
        self.limit = max(1, limit)
        #: The credit window (``--content-window``): a content packet that needs a
        #: seq of its own waits while this many of the session's packets are
        #: unacknowledged on the stream; 0: no window (only ``limit``).
        self.window = max(0, window)
        #: Characters of content text in the unacknowledged packets (for WINDOW_CHARS).
        self._content_chars = 0
        #: Whether the dispatcher ever acknowledged (a window needs acks to open again).
        self._acks_seen = False
        #: The writer's non-blocking hand-over (``StreamWriter.send_nowait``), if
        #: given: then content without credit is *held* instead of waiting.
        self._nowait: Callable[[Outgoing[ipb.UpstreamPacket]], bool] | None = None
        #: The writer's ``take_fold``, if given: ``fold`` folds content with credit
        #: into the session's packet still waiting in the writer's queue.
        self._take_fold: Callable[[ipb.UpstreamPacket], bool] | None = None
        #: The content packet numbered and kept but not yet handed to the writer
        #: (no credit): later chunks fold into it; handed over on an ack, or
        #: ahead of the next packet that does not wait for credit.
        self._held: ipb.UpstreamPacket | None = None
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
        #: Characters of text in the last kept packet, if more content may be
        #: folded into it (-1 when not: not content, an answer's end, or kept
        #: while away).
        self._tail_chars = -1

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

        Returns once the packet is kept (and, attached, queued for the writer,
        or folded into the packet before it, which is kept): from then on it
        reaches a dispatcher unless the session is abandoned. Waits while
        ``limit`` packets are unrecorded, or while the writer's queue is full.
        Raises :class:`SessionAbandoned` when the session cannot go on.
        """
        packet = out.message
        assert packet is not None
        lock = self._lock
        try:
            lock.acquire_nowait()  # no task switch when nobody holds it
        except anyio.WouldBlock:
            await lock.acquire()
        try:
            is_content = packet.HasField("content")
            hold = False
            while self.abandoned is None:
                waiting = len(self._unacked)
                if waiting >= self.limit:
                    if self._writer is None:
                        self.abandon(
                            f"{waiting} packets wait unrecorded while the dispatcher "
                            f"is away, the limit is {self.limit} (--handover-buffer)"
                        )
                        break
                elif not (is_content and self._no_credit()):
                    break
                elif self._nowait is not None:
                    held = self._held
                    if held is None:
                        hold = True
                        break
                    chars = len(packet.content.text)
                    if self._tail_chars >= 0 and self._tail_chars + chars <= COALESCE_CHARS:
                        _merge_content(held, packet)
                        self._content_chars += chars
                        more = not packet.content.is_finish
                        self._tail_chars = self._tail_chars + chars if more else -1
                        out.taken = True
                        return
                elif self._writer is not None and await self._fold_without_credit(
                    out, packet, self._writer
                ):
                    return
                await self._changed.wait()  # an ack frees room (or credit)
            if self.abandoned is not None:
                raise SessionAbandoned(f"session abandoned: {self.abandoned}")
            if hold:
                self._seq += 1
                packet.seq = self._seq
                self._unacked.append(packet)
                self._content_chars += len(packet.content.text)
                self._held = packet
                more = not packet.content.is_finish
                self._tail_chars = len(packet.content.text) if more else -1
                out.taken = True
                return
            held = self._held
            if held is not None and self._writer is not None:
                # The held content goes first (credit or not): nothing overtakes it.
                first = Outgoing(held)
                try:
                    await self._writer(first)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # the stream is gone: kept for the re-attach
                except BaseException:
                    if first.taken:
                        self._held = None
                    raise
                self._held = None
            previous = self._unacked[-1] if self._unacked else None
            self._seq += 1
            packet.seq = self._seq
            self._unacked.append(packet)
            if is_content:
                self._content_chars += len(packet.content.text)
            writer = self._writer
            if writer is None:
                self._tail_chars = -1  # a re-attach resends it as it is
                out.taken = True  # kept: it goes out after the re-attach
                return
            chars = -1  # the text's length, for content
            more = False  # whether more content may follow it in one packet
            if packet.HasField("content"):
                chars = len(packet.content.text)
                more = not packet.content.is_finish
            if (
                previous is not None
                and chars >= 0
                and self._tail_chars >= 0
                and self._tail_chars + chars <= COALESCE_CHARS
                and previous.seq > self.acked
            ):
                # Consecutive content: folded into the previous packet if that
                # one still waits for the writer (it keeps its seq; never one
                # the dispatcher has acknowledged, which it would not take again).
                inner = Outgoing(packet, previous, _merge_content)
            else:
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
                    if is_content:
                        self._content_chars -= len(packet.content.text)
                    raise
                out.taken = True
                self._taken(inner, chars, more)
                raise
            out.taken = True
            self._taken(inner, chars, more)
        finally:
            lock.release()

    def fold_content(self, text: str, is_finish: bool) -> bool:
        """Fold a content chunk into the session's last packet at once, where
        ``send`` would fold it; False otherwise (then ``send`` the chunk's packet
        as usual). Two cases: no credit, into the held packet (not full); or
        credit, into the packet still waiting in the writer's queue (the
        writer's ``take_fold`` agrees: it counts the hand-over, and declines
        when ``send`` would yield to the loop first). Never while another
        producer hands over.

        The flood's common case without a task switch, a lock or a packet of
        its own: the chunk's text is appended to that packet, which keeps its
        seq (it is the last kept packet, nothing can come between).
        """
        if self._lock.locked() or self.abandoned is not None:
            return False
        chars = len(text)
        tail = self._tail_chars
        if tail < 0 or tail + chars > COALESCE_CHARS or len(self._unacked) >= self.limit:
            return False
        held = self._held
        if held is None:
            take = self._take_fold
            if take is None or not self._unacked or self._writer is None or self._no_credit():
                return False  # (no credit, nothing held: ``send`` holds it)
            previous = self._unacked[-1]
            if previous.seq <= self.acked or not take(previous):
                return False
            held = previous
        elif not self._no_credit():
            return False  # credit: ``send`` hands the held packet over first
        content = held.content
        content.text += text
        content.is_finish = is_finish
        self._content_chars += chars
        self._tail_chars = -1 if is_finish else tail + chars
        return True

    def _no_credit(self) -> bool:
        """Whether content that needs a seq of its own must wait (the held packet,
        not handed over yet, does not count)."""
        if self.window <= 0 or not self._acks_seen or self._writer is None:
            return False
        waiting, chars = len(self._unacked), self._content_chars
        held = self._held
        if held is not None:
            waiting -= 1
            chars -= len(held.content.text)
        return waiting >= self.window or chars >= WINDOW_CHARS

    def _release_held(self) -> None:
        """Hand the held packet to the writer if there is credit (never while a
        producer holds the lock: it hands it over itself, in order)."""
        held, nowait = self._held, self._nowait
        if held is None or nowait is None or self._lock.locked() or self._no_credit():
            return
        out = Outgoing(held)
        try:
            nowait(out)
        except anyio.ClosedResourceError:
            return
        if out.taken:
            self._held = None

    async def _fold_without_credit(
        self, out: Outgoing[ipb.UpstreamPacket], packet: ipb.UpstreamPacket, writer: WriterSend
    ) -> bool:
        """Fold content into the session's packet still waiting for the writer (no credit
        needed: it gets no seq); False when there is none, or it is full."""
        if self._tail_chars < 0 or not self._unacked:
            return False
        chars = len(packet.content.text)
        if self._tail_chars + chars > COALESCE_CHARS:
            return False
        previous = self._unacked[-1]
        inner = Outgoing(packet, previous, _merge_content, fold_only=True)
        try:
            await writer(inner)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False  # the stream is gone: the caller sees the detach
        except BaseException:
            if inner.merged:
                out.taken = True
                self._taken(inner, chars, not packet.content.is_finish, numbered=False)
            raise
        if not inner.merged:
            return False
        out.taken = True
        self._taken(inner, chars, not packet.content.is_finish, numbered=False)
        return True

    def _taken(
        self,
        inner: Outgoing[ipb.UpstreamPacket],
        chars: int,
        more: bool,
        *,
        numbered: bool = True,
    ) -> None:
        """Bookkeeping once the writer took ``inner`` (see ``send``); ``numbered``:
        it was given a seq and kept (undone if it was folded)."""
        if inner.merged:
            # It went out inside the packet before it: no seq of its own.
            assert inner.message is not None
            inner.message.seq = 0
            if numbered:
                self._unacked.pop()
                self._seq -= 1
            else:
                self._content_chars += chars
            chars += self._tail_chars
        self._tail_chars = chars if more else -1

    # --- the slot's side ---

    def on_ack(self, upstream_seq: int) -> None:
        """The dispatcher recorded every packet up to ``upstream_seq`` (cumulative)."""
        self._acks_seen = True
        if upstream_seq <= self.acked:
            return
        self.acked = upstream_seq
        while self._unacked and self._unacked[0].seq <= upstream_seq:
            done = self._unacked.popleft()
            if done.HasField("content"):
                self._content_chars -= len(done.content.text)
        self._release_held()
        self._notify()

    def detach(self) -> None:
        """The stream is lost (or the dispatcher asked us to move): keep what comes."""
        if self._writer is not None:
            self._writer = None
            self.detached_at = time.monotonic()
        self._nowait, self._held = None, None  # a held packet is kept: resent on re-attach
        self._take_fold = None
        self._tail_chars = -1
        self._notify()

    def attach_new(
        self,
        writer: WriterSend,
        nowait: Callable[[Outgoing[ipb.UpstreamPacket]], bool] | None = None,
        take_fold: Callable[[ipb.UpstreamPacket], bool] | None = None,
    ) -> None:
        """Start on the stream that started the session (nothing is kept yet);
        ``nowait``: the writer's ``send_nowait`` (content without credit is held);
        ``take_fold``: the writer's ``take_fold`` (see ``fold_content``)."""
        self._writer = writer
        self._nowait = nowait
        self._take_fold = take_fold

    async def attach(
        self,
        writer: WriterSend,
        recorded: int,
        nowait: Callable[[Outgoing[ipb.UpstreamPacket]], bool] | None = None,
        take_fold: Callable[[ipb.UpstreamPacket], bool] | None = None,
    ) -> int:
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
            self._nowait, self._held = nowait, None
            self._take_fold = take_fold
            self._tail_chars = -1
            self.detached_at = None
            self._notify()
            return resent

    def abandon(self, reason: str) -> None:
        """Give the session up (nothing more is sent); the session is told once."""
        if self.abandoned is not None:
            return
        self.abandoned = reason
        self._writer = None
        self._nowait, self._held = None, None
        self._take_fold = None
        self._notify()
        if self._on_abandon is not None:
            self._on_abandon(reason)
