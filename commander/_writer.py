"""The one writer of a gRPC stream.

grpc.aio cancels the whole RPC when the task awaiting ``call.write()`` is
cancelled. So planners never write to the call themselves: they hand messages
to a :class:`StreamWriter` (cancelling *that* wait is harmless), and one
long-lived writer task owns ``call.write()``.

The hand-over is a bounded queue, not a rendezvous: a producer appends its
message and goes on without a task switch while there is room; the writer
task wakes on one event and writes everything that waits, in order. The
queue holds at most :data:`QUEUE_LIMIT` messages: a producer that finds it
full waits until the writer has brought it down to half, so HTTP/2 flow
control still reaches the planner and nothing grows without bound. A
producer also yields to the event loop every :data:`YIELD_EVERY` messages,
so that a planner that never waits cannot starve the other tasks (the
writer, the slot's reader, other slots).

A message may be folded into the one waiting at the tail of the queue
(:attr:`Outgoing.into`, e.g. consecutive content chunks of one session): only
while that one is still waiting, so a lone message is never held back.

Batches (:meth:`StreamWriter.enable_batches`, a slot's stream to a dispatcher
whose hello ack announced ``max_upstream_batch``): when the writer finds
several messages waiting it writes them as one message (one ``call.write``,
one HTTP/2 message, one wake-up of the dispatcher's receiver), in queue order,
at most the announced number and about :data:`BATCH_BYTES`. It never waits to
fill a batch: a lone message is written alone, at once. The order on the wire
is the queue's, so nothing overtakes anything (a ``stopped`` behind content
rides in the same message instead of waiting for that content's write).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")

#: Messages that may wait for the writer (the producers' back-pressure bound).
QUEUE_LIMIT = 4
#: A producer that finds the queue full waits until it is down to this many.
_LOW_WATER = QUEUE_LIMIT // 2
#: A producer that never had to wait yields to the event loop after this many messages.
#: Small: a flooding planner's turn is one slice of the loop, and the slot's
#: reader (a stop) waits for the loop's turns. 4 costs a flood little
#: (scripts/bench_pyceiling.py: ~2x raw grpc.aio with a 16 Ki credit window;
#: the credit window, not this, is what paces a flood).
YIELD_EVERY = 4
#: A batch stops before the message that would take it past this many bytes
#: (a message larger than this is written alone, unwrapped): far below any
#: dispatcher's message size limit, a few HTTP/2 frames.
BATCH_BYTES = 32 * 1024


class Outgoing(Generic[T]):
    """A message handed to the writer; ``taken`` tells whether the writer got it.

    Once ``taken``, the message is written unless the stream breaks first. A
    producer cancelled while handing over checks ``taken`` to know whether
    the message will still be written.

    ``into`` and ``merge`` ask the writer to fold this message into an earlier
    one instead of queueing it: if ``into`` is the message waiting at the tail
    of the queue (not yet being written) and ``merge(into, message)`` agrees
    (it changes ``into`` in place and returns True), the writer sets
    ``merged`` and ``message`` itself is never written. With ``fold_only``
    a message that cannot be folded is not queued either: ``send`` returns
    with neither ``merged`` nor ``taken`` set (nothing was handed over).
    """

    __slots__ = ("fold_only", "into", "merge", "merged", "message", "taken")

    def __init__(
        self,
        message: T | None,
        into: T | None = None,
        merge: Callable[[T, T], bool] | None = None,
        *,
        fold_only: bool = False,
    ) -> None:
        self.message = message
        self.taken = False
        self.merged = False
        self.into = into
        self.merge = merge
        self.fold_only = fold_only


class StreamWriter(Generic[T]):
    """Serialises every write to one stream; ``run()`` is the writer task.

    ``accept`` sees each message just before it is written and may drop it
    (returns False) — the place where invariants such as "nothing of a session
    after its terminal packet" are enforced for every producer at once.
    """

    def __init__(
        self,
        write: Callable[[T], Awaitable[None]],
        done_writing: Callable[[], Awaitable[None]],
        accept: Callable[[T], bool] | None = None,
    ) -> None:
        self._write = write
        self._done_writing = done_writing
        self._accept = accept
        # Bounded by QUEUE_LIMIT: send() waits for room before it appends.
        self._queue: collections.deque[Outgoing[T]] = collections.deque()
        self._wake = anyio.Event()  # set when the queue gets a message (or closes)
        self._room = anyio.Event()  # set when the queue is down to _LOW_WATER
        self._room.set()
        self._closed = False
        self._half_closed = False
        self._since_yield = 0
        # Batches (enable_batches): most messages per batch (<= 1: none), how
        # to wrap several messages in one, and a message's size in bytes.
        self._batch_limit = 0
        self._make_batch: Callable[[list[T]], T] | None = None
        self._size: Callable[[T], int] | None = None
        #: Batches written, and the messages in them (for tests and benches).
        self.batches = 0
        self.batched = 0

    def enable_batches(
        self, limit: int, make_batch: Callable[[list[T]], T], size: Callable[[T], int]
    ) -> None:
        """From now on write up to ``limit`` waiting messages as one,
        ``make_batch(messages)``; ``size(message)`` is its size in bytes (a batch
        stays within about :data:`BATCH_BYTES`). ``limit`` <= 1: no batches."""
        self._batch_limit = limit
        self._make_batch = make_batch
        self._size = size

    def send_nowait(self, out: Outgoing[T]) -> bool:
        """Queue (or fold) ``out`` if there is room; False (not taken) if the queue is full.

        An ``out.fold_only`` message that cannot be folded: True, not taken.

        Raises :class:`anyio.ClosedResourceError` once the writer is closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        queue = self._queue
        into = out.into
        if (
            into is not None
            and queue
            and queue[-1].message is into
            and out.merge is not None
            and out.message is not None
            and out.merge(into, out.message)
        ):
            out.merged = True
        elif out.fold_only:
            return True
        elif len(queue) < QUEUE_LIMIT:
            queue.append(out)
            if len(queue) == 1:
                self._wake.set()
        else:
            return False
        out.taken = True
        return True

    def take_fold(self, into: T) -> bool:
        """Whether a producer may fold a message into ``into`` right now, itself:
        True if ``into`` waits at the tail of the queue (not being written) and
        no yield is due (it counts as a hand-over, as ``send`` would). The
        producer then changes ``into`` in place before it awaits anything."""
        queue = self._queue
        if self._closed or not queue or queue[-1].message is not into:
            return False
        if self._since_yield + 1 >= YIELD_EVERY:
            return False  # ``send`` yields to the loop first
        self._since_yield += 1
        return True

    async def send(self, out: Outgoing[T]) -> None:
        """Hand ``out`` to the writer; returns once it is queued (``out.taken``),
        or, ``out.fold_only``, once it was folded or found that it cannot be.

        Without a task switch while there is room, except every
        :data:`YIELD_EVERY` messages (a checkpoint before ``out`` is taken);
        waits while the queue is full. Cancelled there, nothing was handed over.
        Raises :class:`anyio.ClosedResourceError` once the writer is closed.
        """
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await anyio.lowlevel.checkpoint()
        while not self.send_nowait(out):
            if self._room.is_set():
                self._room = anyio.Event()
            self._since_yield = 0
            await self._room.wait()

    async def write(self, message: T) -> None:
        """Shorthand for ``send(Outgoing(message))``."""
        await self.send(Outgoing(message))

    async def half_close(self) -> None:
        """Ask the writer to half-close the stream after what it has taken so far."""
        await self.send(Outgoing(None))

    def discard(self, drop: Callable[[T], bool]) -> int:
        """Remove the waiting messages (not those being written) for which
        ``drop`` is true; returns how many. Their producers saw them ``taken``
        (as for a message whose write failed)."""
        queue = self._queue
        kept = [out for out in queue if out.message is None or not drop(out.message)]
        dropped = len(queue) - len(kept)
        if dropped:
            queue.clear()
            queue.extend(kept)
            if len(queue) <= _LOW_WATER:
                self._room.set()
        return dropped

    def close(self) -> None:
        """Close the queue; call once the writer task is gone (later sends fail).

        Messages still waiting are dropped (their producers saw them ``taken``,
        as they would have seen a message whose write failed).
        """
        self._closed = True
        self._queue.clear()
        self._wake.set()
        self._room.set()

    async def run(self) -> None:
        """Write messages until cancelled or closed; errors propagate."""
        queue = self._queue
        while True:
            if not queue:
                if self._closed:
                    return
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            out = queue.popleft()
            if len(queue) <= _LOW_WATER and not self._room.is_set():
                self._room.set()
            if out.message is None:
                if not self._half_closed:
                    self._half_closed = True
                    await self._done_writing()
                continue
            if self._half_closed:
                continue
            if self._accept is not None and not self._accept(out.message):
                continue
            message = out.message
            if queue and self._batch_limit > 1 and queue[0].message is not None:
                message = self._take_batch(message)
                if len(queue) <= _LOW_WATER and not self._room.is_set():
                    self._room.set()
            await self._write(message)

    def _take_batch(self, first: T) -> T:
        """``first`` and the messages waiting behind it, as one batch if there
        are any (up to the limit, within BATCH_BYTES, up to a half-close)."""
        size, make_batch, accept = self._size, self._make_batch, self._accept
        assert size is not None and make_batch is not None
        total = size(first)
        if total >= BATCH_BYTES:
            return first
        queue = self._queue
        batch = [first]
        while queue and len(batch) < self._batch_limit:
            message = queue[0].message
            if message is None:
                break  # the half-close: after what came before it
            n = size(message)
            if total + n > BATCH_BYTES:
                break
            queue.popleft()
            if accept is not None and not accept(message):
                continue
            batch.append(message)
            total += n
        if len(batch) == 1:
            return first
        self.batches += 1
        self.batched += len(batch)
        return make_batch(batch)
