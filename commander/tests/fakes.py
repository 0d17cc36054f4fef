"""In-process stand-ins for the dispatcher and for an OpenAI-compatible model server.

* :class:`FakeDispatcher` — a real grpc.aio server on port 0 serving
  ``AgentInteraction`` and ``ToolProviderService`` from the generated code; a
  test drives each connected slot or provider by hand.
* :class:`ScriptedLLM` — a tiny asyncio HTTP server that answers
  ``/v1/chat/completions`` with scripted SSE ``chat.completion.chunk``s at a set
  pace and records whether the client closed the stream before the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import interaction_pb2_grpc, tools_pb2, tools_pb2_grpc

TERMINAL = ("result", "stopped")
# Default bound of every wait in the fakes: a hang guard, never a timing
# claim (every wait is for something that must happen). 30 s, not 10: the
# first test of a fresh process also pays the imports and the first
# connection, and at a very low CPU share that took over 10 s (1 run in 25).
WAIT = 30.0


class _Server(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Server)


@contextlib.asynccontextmanager
async def running(server: _S) -> AsyncIterator[_S]:
    """``server`` (a :class:`DispatcherServer` or :class:`ScriptedLLM`) started, and
    stopped on the way out."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class FakeSlot:
    """One ChatStream as the fake dispatcher sees it."""

    def __init__(self, auto_close: bool) -> None:
        self.hello: ipb.Hello | None = None
        self.metadata: dict[str, str] = {}
        self.received: list[ipb.UpstreamPacket] = []
        self._inbox: asyncio.Queue[ipb.UpstreamPacket] = asyncio.Queue()
        self._outbox: asyncio.Queue[ipb.DownstreamPacket | None] = asyncio.Queue()
        self.auto_close = auto_close
        #: UpstreamBatch messages received (their packets are in ``received``).
        self.batches: list[int] = []
        self.ended = asyncio.Event()
        #: Set when the commander half-closed the stream (a clean end, not a cancel).
        self.half_closed = asyncio.Event()
        self._sessions = 0

    async def send(self, packet: ipb.DownstreamPacket) -> None:
        await self._outbox.put(packet)

    def end(self) -> None:
        """End the RPC from the dispatcher's side."""
        self._outbox.put_nowait(None)

    async def recv(self, within: float = WAIT) -> ipb.UpstreamPacket:
        return await asyncio.wait_for(self._inbox.get(), within)

    async def recv_until_terminal(self, within: float = WAIT) -> list[ipb.UpstreamPacket]:
        """Packets up to and including the session's terminal packet."""
        packets: list[ipb.UpstreamPacket] = []
        deadline = time.monotonic() + within
        while True:
            packet = await self.recv(max(0.01, deadline - time.monotonic()))
            packets.append(packet)
            if packet.WhichOneof("payload") in TERMINAL:
                return packets

    async def recv_kind(self, kind: str, within: float = WAIT) -> ipb.UpstreamPacket:
        """The next packet of that payload kind (others are skipped)."""
        deadline = time.monotonic() + within
        while True:
            packet = await self.recv(max(0.01, deadline - time.monotonic()))
            if packet.WhichOneof("payload") == kind:
                return packet

    def pending(self) -> list[ipb.UpstreamPacket]:
        """Whatever arrived and was not yet taken."""
        items = []
        while not self._inbox.empty():
            items.append(self._inbox.get_nowait())
        return items

    async def start(
        self,
        instruction: str = "hello",
        *,
        planner: str = "chat",
        tools: list[ipb.ToolSpec] | None = None,
        **fields: Any,
    ) -> str:
        """Send a start; returns the new session id."""
        self._sessions += 1
        session_id = f"s-{id(self) % 10_000}-{self._sessions}"
        start = ipb.StartSession(
            task_id=f"task-{self._sessions}",
            instruction=instruction,
            planner=planner,
            tools=tools or [],
            **fields,
        )
        await self.send(ipb.DownstreamPacket(session_id=session_id, start=start))
        return session_id

    async def stop(
        self, session_id: str, reason: str = "cancelled by client", code: int = 1
    ) -> None:
        await self.send(
            ipb.DownstreamPacket(
                session_id=session_id,
                stop=ipb.StopSignal(reason=reason, code=code),  # type: ignore[arg-type]
            )
        )

    async def tool_result(
        self, session_id: str, call: ipb.ToolCallRequest, result_json: str = "", **error: Any
    ) -> None:
        result = ipb.ToolCallResult(
            call_id=call.call_id, tool_name=call.tool_name, result_json=result_json
        )
        if error:
            result.error.CopyFrom(ipb.ToolError(**error))
        await self.send(ipb.DownstreamPacket(session_id=session_id, tool_result=result))

    async def user_input(self, session_id: str, text: str) -> None:
        await self.send(
            ipb.DownstreamPacket(
                session_id=session_id, user_input=ipb.UserInput(message_id="m1", text=text)
            )
        )


class FakeProvider:
    """One ToolProviderService.Connect stream as the fake dispatcher sees it."""

    def __init__(self) -> None:
        self.hello: tools_pb2.ProviderHello | None = None
        self._inbox: asyncio.Queue[tools_pb2.ConnectRequest] = asyncio.Queue()
        self._outbox: asyncio.Queue[tools_pb2.ConnectResponse | None] = asyncio.Queue()

    async def send(self, message: tools_pb2.ConnectResponse) -> None:
        await self._outbox.put(message)

    async def recv(self, within: float = WAIT) -> tools_pb2.ConnectRequest:
        return await asyncio.wait_for(self._inbox.get(), within)

    async def invoke(self, invocation_id: str, tool_name: str, arguments: Any, **kw: Any) -> None:
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        await self.send(
            tools_pb2.ConnectResponse(
                invoke=tools_pb2.Invocation(
                    invocation_id=invocation_id, tool_name=tool_name, arguments_json=args, **kw
                )
            )
        )

    async def cancel(self, invocation_id: str) -> None:
        await self.send(
            tools_pb2.ConnectResponse(
                cancel=tools_pb2.CancelInvocation(invocation_id=invocation_id, reason="stop")
            )
        )


class FakeDispatcher(
    interaction_pb2_grpc.AgentInteractionServicer, tools_pb2_grpc.ToolProviderServiceServicer
):
    """Servicer side of the fake: hands every new slot/provider stream to the test."""

    def __init__(
        self,
        *,
        auto_close: bool = True,
        ack_hello: bool = True,
        end_on_half_close: bool = True,
        max_upstream_batch: int = 0,
    ) -> None:
        self.slots: asyncio.Queue[FakeSlot] = asyncio.Queue()
        self.providers: asyncio.Queue[FakeProvider] = asyncio.Queue()
        self.auto_close = auto_close
        self.ack_hello = ack_hello
        #: Whether a slot's stream is ended when the commander half-closes it (as
        #: the dispatcher does); False models a dispatcher that never answers.
        self.end_on_half_close = end_on_half_close
        #: Announced in the hello ack (0: like a dispatcher without batches);
        #: a batch's packets are handled (``received``, the inbox) one by one.
        self.max_upstream_batch = max_upstream_batch
        self.streams_opened = 0
        #: Answers a hello with ``reattach`` (None: the plain hello ack, as a
        #: dispatcher refusing for good without a reason). It returns the ack to
        #: send, or a status code and details to end the stream with before any ack.
        self.on_reattach: (
            Callable[[ipb.Reattach], ipb.DownstreamPacket | tuple[grpc.StatusCode, str]] | None
        ) = None
        #: How long ``on_reattach``'s answer takes, in seconds.
        self.reattach_delay = 0.0
        #: The hellos with ``reattach`` received, in order, and when (monotonic).
        self.reattaches: list[ipb.Reattach] = []
        self.reattached_at: list[float] = []

    async def next_slot(self, within: float = WAIT) -> FakeSlot:
        return await asyncio.wait_for(self.slots.get(), within)

    async def next_provider(self, within: float = WAIT) -> FakeProvider:
        return await asyncio.wait_for(self.providers.get(), within)

    # Handlers that use context.read()/write() return None (the stubs only know
    # the iterator style).
    async def ChatStream(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        self.streams_opened += 1
        slot = FakeSlot(self.auto_close)
        slot.metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        first = await context.read()
        if not isinstance(first, ipb.UpstreamPacket) or first.WhichOneof("payload") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "hello first")
        slot.hello = first.hello
        slot.received.append(first)
        if first.hello.HasField("reattach"):
            self.reattaches.append(first.hello.reattach)
            self.reattached_at.append(time.monotonic())
        if first.hello.HasField("reattach") and self.on_reattach is not None:
            await asyncio.sleep(self.reattach_delay)
            answer = self.on_reattach(first.hello.reattach)
            if isinstance(answer, tuple):
                await context.abort(*answer)
            await context.write(answer)
        elif self.ack_hello:
            await context.write(
                ipb.DownstreamPacket(
                    ack=ipb.Ack(
                        kind=ipb.ACK_KIND_HELLO,
                        slot_id="slot-x",
                        max_upstream_batch=self.max_upstream_batch,
                    )
                )
            )
        await self.slots.put(slot)

        async def pump_in() -> None:
            while True:
                packet = await context.read()
                if not isinstance(packet, ipb.UpstreamPacket):
                    slot.half_closed.set()
                    if self.end_on_half_close:
                        slot.end()
                    return
                if packet.WhichOneof("payload") == "batch":
                    assert 0 < len(packet.batch.packets) <= self.max_upstream_batch
                    slot.batches.append(len(packet.batch.packets))
                    packets = list(packet.batch.packets)
                else:
                    packets = [packet]
                for packet in packets:
                    slot.received.append(packet)
                    await slot._inbox.put(packet)
                    if slot.auto_close and packet.WhichOneof("payload") in TERMINAL:
                        await slot.send(
                            ipb.DownstreamPacket(
                                session_id=packet.session_id,
                                ack=ipb.Ack(kind=ipb.ACK_KIND_SESSION_CLOSED),
                            )
                        )

        try:
            await _pump(context, slot._outbox, pump_in)
        finally:
            slot.ended.set()

    async def Connect(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        provider = FakeProvider()
        first = await context.read()
        if not isinstance(first, tools_pb2.ConnectRequest) or first.WhichOneof("msg") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "hello first")
        provider.hello = first.hello
        await context.write(
            tools_pb2.ConnectResponse(
                welcome=tools_pb2.Welcome(registered_tools=[t.name for t in first.hello.tools])
            )
        )
        await self.providers.put(provider)

        async def pump_in() -> None:
            while True:
                message = await context.read()
                if not isinstance(message, tools_pb2.ConnectRequest):
                    await provider._outbox.put(None)
                    return
                await provider._inbox.put(message)

        await _pump(context, provider._outbox, pump_in)


async def _pump(
    context: Any, outbox: asyncio.Queue[Any], pump_in: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Writes ``outbox`` to the stream until a None, while ``pump_in`` reads the other way."""
    reader = asyncio.create_task(pump_in())
    try:
        while True:
            out = await outbox.get()
            if out is None:
                return
            await context.write(out)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


class DispatcherServer:
    """A FakeDispatcher on a real port; can be stopped and restarted on the same port."""

    def __init__(
        self,
        servicer: FakeDispatcher | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.servicer = servicer or FakeDispatcher()
        self.credentials = credentials
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        interaction_pb2_grpc.add_AgentInteractionServicer_to_server(self.servicer, server)
        tools_pb2_grpc.add_ToolProviderServiceServicer_to_server(self.servicer, server)
        address = f"127.0.0.1:{self.port}"
        if self.credentials is not None:
            self.port = server.add_secure_port(address, self.credentials)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


class DownAddress:
    """An address where no dispatcher answers: it accepts TCP connections and closes
    them at once, counting them — every connection attempt of a client shows here."""

    def __init__(self) -> None:
        self.dials: list[float] = []
        self._dialled = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_for_dials(self, count: int, within: float = WAIT) -> None:
        """Returns once ``count`` connections have been attempted."""
        deadline = time.monotonic() + within
        while len(self.dials) < count:
            self._dialled.clear()
            await asyncio.wait_for(self._dialled.wait(), max(0.01, deadline - time.monotonic()))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.dials.append(time.monotonic())
        self._dialled.set()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# --- the scripted model server ---


@dataclasses.dataclass
class Reply:
    """One scripted answer to a chat completion request."""

    deltas: list[dict[str, Any]]
    delay: float = 0.0
    usage: dict[str, int] | None = None
    finish_reason: str = "stop"
    status: int = 200
    #: The body of an error reply (``status`` not 200); a JSON error object by default.
    body: bytes | None = None
    #: Extra headers of an error reply (e.g. ``location`` for a redirect).
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    #: A 200 event stream that ends without any chunk or [DONE] (what
    #: llama-cpp-python sends for a prompt over its context window).
    empty: bool = False

    @classmethod
    def text(cls, text: str, *, delay: float = 0.0, **kw: Any) -> Reply:
        """The answer ``text``, streamed a word at a time."""
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return cls([{"content": p} for p in pieces], delay=delay, **kw)

    @classmethod
    def tool_call(cls, name: str, arguments: Any, *, call_id: str = "call_1") -> Reply:
        """A single function call, its arguments split over two chunks."""
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        half = len(args) // 2
        return cls(
            [
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": args[:half]},
                        }
                    ]
                },
                {"tool_calls": [{"index": 0, "function": {"arguments": args[half:]}}]},
            ],
            finish_reason="tool_calls",
        )


@dataclasses.dataclass
class StreamRecord:
    """What happened to one streamed response."""

    request: dict[str, Any]
    total: int
    #: The request's headers, names in lower case.
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    sent: int = 0
    completed: bool = False
    client_closed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    closed_at: float | None = None


class ScriptedLLM:
    """OpenAI-compatible streaming server answering from a list of :class:`Reply`."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.streams: list[StreamRecord] = []
        self.stream_started = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0
        #: What GET /models lists (none by default).
        self.models: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        return [s.request for s in self.streams]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if ":" in line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if head.startswith(b"GET ") and head.split(b" ", 2)[1].endswith(b"/models"):
            listed = json.dumps(
                {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(listed)}\r\nconnection: close\r\n\r\n".encode()
                + listed
            )
            await writer.drain()
            return
        request = json.loads(body or b"{}")
        reply = self.replies.pop(0) if self.replies else Reply.text("(no script left)")
        if reply.status != 200:
            payload = reply.body
            if payload is None:
                payload = json.dumps(
                    {"error": {"message": "scripted failure", "type": "x"}}
                ).encode()
            extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
            writer.write(
                f"HTTP/1.1 {reply.status} Error\r\ncontent-type: application/json\r\n{extra}"
                f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            self.streams.append(
                StreamRecord(request=request, total=0, completed=True, headers=headers)
            )
            return
        if reply.empty:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            )
            await writer.drain()
            self.streams.append(
                StreamRecord(request=request, total=0, completed=True, headers=headers)
            )
            return
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        # Chunks name the requested model, as llama-cpp-python and scriptedllm do.
        name = str(request.get("model") or "scripted")
        chunks = [_chunk({**d}, model=name) for d in reply.deltas]
        chunks.append(_chunk({}, finish_reason=reply.finish_reason, model=name))
        if include_usage and reply.usage is not None:
            chunks.append({**_chunk({}, model=name), "choices": [], "usage": reply.usage})
        record = StreamRecord(request=request, total=len(chunks), headers=headers)
        self.streams.append(record)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n\r\n"
        )
        await writer.drain()
        self.stream_started.set()

        def hung_up() -> None:
            if record.closed_at is None:
                record.closed_at = time.monotonic()
            record.client_closed.set()

        async def watch_close() -> None:
            # The client sends nothing after its request: EOF means it hung up,
            # and so does a reset (a socket closed with our chunks unread in it).
            with contextlib.suppress(ConnectionError):
                await reader.read(1)
            hung_up()

        watcher = asyncio.create_task(watch_close())
        try:
            for chunk in chunks:
                if record.client_closed.is_set():
                    return
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await writer.drain()
                record.sent += 1
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
            record.completed = True
        except ConnectionError:
            # The client's reset can fail a write before the watcher has run:
            # that is its hang-up too (the watcher, cancelled below, never
            # recorded it, and test_stop waited for it in vain).
            hung_up()
        finally:
            if not record.client_closed.is_set():
                watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _chunk(
    delta: dict[str, Any], finish_reason: str | None = None, model: str = "scripted"
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


async def everything_sent(slot: FakeSlot, within: float = WAIT) -> list[ipb.UpstreamPacket]:
    """Every packet the commander wrote on this stream, once the stream has ended
    (call it after the commander has shut down: then nothing can come later)."""
    await asyncio.wait_for(slot.ended.wait(), within)
    return slot.received


def after_terminal(packets: list[ipb.UpstreamPacket], session_id: str) -> list[ipb.UpstreamPacket]:
    """The packets of ``session_id`` that came after its terminal packet."""
    mine = [p for p in packets if p.session_id == session_id]
    for i, packet in enumerate(mine):
        if packet.WhichOneof("payload") in TERMINAL:
            return mine[i + 1 :]
    raise AssertionError(f"session {session_id} sent no terminal packet")


async def wait_for(predicate: Callable[[], bool], within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)
