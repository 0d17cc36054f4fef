"""The one writer of a gRPC stream.

grpc.aio cancels the whole RPC when the task awaiting ``call.write()`` is
cancelled. So planners never write to the call themselves: they hand messages
to a :class:`StreamWriter` over a zero-capacity memory stream (cancelling
*that* wait is harmless), and one long-lived writer task owns ``call.write()``.
The rendezvous keeps the producer at most one message ahead of the network:
HTTP/2 flow control reaches the planner, and no queue grows without bound.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class Outgoing(Generic[T]):
    """A message handed to the writer; ``taken`` tells whether the writer got it.

    A producer cancelled while handing over can check ``taken`` to know whether
    the message will still be written (anyio may deliver the item and still
    raise the cancellation in the sender).
    """

    __slots__ = ("message", "taken")

    def __init__(self, message: T | None) -> None:
        self.message = message
        self.taken = False


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
        self._send, self._recv = anyio.create_memory_object_stream[Outgoing[T]](0)
        self._half_closed = False

    async def send(self, out: Outgoing[T]) -> None:
        """Hand ``out`` to the writer; returns once the writer has taken it."""
        await self._send.send(out)

    async def write(self, message: T) -> None:
        """Shorthand for ``send(Outgoing(message))``."""
        await self.send(Outgoing(message))

    async def half_close(self) -> None:
        """Ask the writer to half-close the stream after what it has taken so far."""
        await self._send.send(Outgoing(None))

    def close(self) -> None:
        """Release both ends; call once the writer task is gone (later sends fail)."""
        self._send.close()
        self._recv.close()

    async def run(self) -> None:
        """Write messages until cancelled or the producer side is closed; errors propagate."""
        async for out in self._recv:
            out.taken = True
            if out.message is None:
                if not self._half_closed:
                    self._half_closed = True
                    await self._done_writing()
                continue
            if self._half_closed:
                continue
            if self._accept is not None and not self._accept(out.message):
                continue
            await self._write(out.message)
