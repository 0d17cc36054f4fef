"""One session on a slot: the planner, its tool calls, user input, stop and usage.

This is the runtime behind a :class:`~commander.SessionContext` (which lives in
:mod:`commander._context`, with the ``Planner`` type); the slot owns the stream
and drives this module, which must never read or write the gRPC call itself.

The life of a session (see docs/protocol.md):

* the slot's reader hands a ``start`` to :class:`Session`, whose coordinator
  task (:meth:`Session.run`) starts the planner in its own task and cancel
  scope;
* the planner's outputs and tool calls go to the stream's single writer;
* a ``stop`` cancels *only* the planner's scope — never the tasks that read or
  write the gRPC call — which closes the in-flight model stream (the planner's
  own shielded, time-bounded cleanup) and abandons pending tool waits;
* the coordinator then sends exactly one terminal packet: ``stopped`` with the
  usage not yet reported, or ``result``; and waits for ``SESSION_CLOSED``.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from commander import _metrics
from commander._connection import MAX_MESSAGE_BYTES, now_us
from commander._context import (
    Planner,
    PlannerOutput,
    PlannerReturn,
    SessionContext,
    merge_usage,
)
from commander._errors import (
    CommanderError,
    InvalidToolArgumentsError,
    stop_code_name,
    tool_error_code_name,
    tool_error_from_result,
)
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._handover import SessionAbandoned
from commander._logging import session_ids
from commander._text import valid_text
from commander._timeouts import CLOSED_TIMEOUT, STOP_CANCEL_TIMEOUT
from commander._tracing import TRACER, extract, inject
from commander._writer import Outgoing

_log = logging.getLogger("commander.session")

Send = Callable[[Outgoing[ipb.UpstreamPacket]], Awaitable[None]]
#: Folds a content chunk's (text, is_finish) into the session's last packet at
#: once, without a packet of its own; False when it cannot (``Upstream.fold_content``).
Fold = Callable[[str, bool], bool]

_FIELD_BY_TYPE: dict[type[Any], str] = {
    ipb.ThoughtChain: "thought",
    ipb.ContentChunk: "content",
    ipb.Usage: "usage",
    ipb.StageChange: "stage",
    ipb.Artifact: "artifact",
    ipb.SandboxInUse: "sandbox",
    ipb.ErrorSignal: "error",
}

#: Interjected user messages waiting for the planner; beyond this they are
#: dropped (with an error event), never queued without bound.
USER_INPUT_BACKLOG = 64
#: commander_sessions_total's outcome label of Session.outcome.
_OUTCOME_LABELS = {"SUCCESS": "success", "STOPPED": "stopped"}
#: The default result (the answer text) is capped to this many characters.
_MAX_RESULT_CHARS = 1_000_000
#: The largest packet a session writes: the dispatcher's limit less the room it
#: keeps for the event a packet becomes (docs/protocol.md, "Message sizes").
_MAX_PACKET_BYTES = MAX_MESSAGE_BYTES - 4 * 1024
#: The largest text of one content packet: a longer chunk is split (the
#: message limit less room for the packet's other fields).
_CONTENT_PIECE_BYTES = MAX_MESSAGE_BYTES - 64 * 1024


def split_text(text: str, max_bytes: int) -> list[str]:
    """``text`` in pieces of at most ``max_bytes`` UTF-8 bytes, never splitting a
    character (lone surrogates are counted as the replacement protobuf sends)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return [text]
    pieces: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1  # back to the first byte of a character
        pieces.append(data[start:end].decode("utf-8", "surrogatepass"))
        start = end
    return pieces


#: Resolves a tool call to be issued again (after a hand-over, idempotent tools).
_REISSUE = ipb.ToolCallResult(call_id="\x00reissue")
#: ErrorSignal code of a tool call lost in a hand-over.
LOST_IN_HAND_OVER = "tool_call_lost_in_hand_over"


def _usage_is_empty(u: ipb.Usage) -> bool:
    return not (u.input_tokens or u.output_tokens or u.cost or u.steps)


class Session:
    """Runtime of one session (internal); the slot drives it."""

    def __init__(
        self,
        packet: ipb.DownstreamPacket,
        planner: Planner | Exception,
        send: Send,
        *,
        slot_index: int,
        cancel_timeout: float = STOP_CANCEL_TIMEOUT,
        closed_timeout: float = CLOSED_TIMEOUT,
        fold: Fold | None = None,
    ) -> None:
        self.session_id = packet.session_id
        self.task_id = packet.start.task_id
        self._planner = planner
        self._send = send
        self._fold = fold
        self._slot_index = slot_index
        self._cancel_timeout = cancel_timeout
        self._closed_timeout = closed_timeout
        self._calls = 0
        # call_id → (event, result box, the tool_call packet: its seq once written)
        self._pending: dict[
            str, tuple[anyio.Event, list[ipb.ToolCallResult], ipb.UpstreamPacket]
        ] = {}
        #: The task's attempt number (start.attempt, then each re-attach's).
        self.attempt = packet.start.attempt
        # Tools declared idempotent: a call of one lost in a hand-over is issued again.
        self._idempotent = frozenset(t.name for t in packet.start.tools if t.idempotent)
        # Set while the session is attached to a dispatcher's stream.
        self._attached = anyio.Event()
        self._attached.set()
        #: Why the session was abandoned (its dispatcher did not take it back).
        self.abandoned: str | None = None
        self._usage = ipb.Usage()  # recorded, not yet written
        self._answer: list[str] = []
        self._answer_chars = 0
        self._final: ipb.FinalResult | None = None
        self._failure: BaseException | None = None
        self._stop: ipb.StopSignal | None = None
        self._local_stop: str | None = None
        self._terminal_started = False
        self._planner_scope: anyio.CancelScope | None = None
        self._planner_done = anyio.Event()
        self._wake = anyio.Event()
        #: Set by the slot when the dispatcher acknowledges the terminal packet.
        self.closed = anyio.Event()
        #: Set once the terminal packet has been handed to the writer.
        self.terminal_sent = anyio.Event()
        self._ui_send, self.user_input_receiver = anyio.create_memory_object_stream[ipb.UserInput](
            USER_INPUT_BACKLOG
        )
        self.outcome = "RUNNING"
        self.ctx = SessionContext(self, packet.start)
        # The dispatcher's session span: the parent of ours (see commander._tracing).
        self._trace_parent = extract(packet.start.trace_context)
        self._span: trace.Span = trace.INVALID_SPAN

    # --- called by the slot's reader (never block) ---

    @property
    def stop_requested(self) -> bool:
        """Whether a stop (from the dispatcher or a local shutdown) was requested."""
        return self._stop is not None or self._local_stop is not None

    def request_stop(self, signal: ipb.StopSignal) -> None:
        """The dispatcher's stop: cancel the planner; ``stopped`` follows."""
        if self._terminal_started:
            return
        self._stop = signal
        self._span.add_event(
            "stop requested",
            {"stop.code": stop_code_name(signal.code), "stop.reason": signal.reason},
        )
        self._cancel_planner()

    def request_local_stop(self, reason: str) -> None:
        """Stop on our own (shutdown): cancel the planner; ``result FAILURE`` follows."""
        if self._terminal_started or self.stop_requested:
            return
        self._local_stop = reason
        self._cancel_planner()

    def _cancel_planner(self) -> None:
        if self._planner_scope is not None:
            self._planner_scope.cancel()
        self._wake.set()

    # --- hand-over (called by the slot) ---

    def detached(self) -> None:
        """The stream is lost: the session goes on; tool calls wait for the re-attach."""
        if self._attached.is_set():
            self._attached = anyio.Event()

    def reattached(self, recorded: int, attempt: int) -> None:
        """Re-attached to a dispatcher that recorded our packets up to ``recorded``.

        A tool call recorded before the hand-over ran (or was cut short) on the
        dispatcher that is gone: it is issued again if its tool is idempotent,
        else the planner gets a retryable error (``PROVIDER_UNAVAILABLE``). A
        call recorded after it is the new dispatcher's to run.
        """
        self.attempt = attempt
        for call_id, (event, box, packet) in list(self._pending.items()):
            if box or not 0 < packet.seq <= recorded:
                continue
            tool = packet.tool_call.tool_name
            if tool in self._idempotent:
                box.append(_REISSUE)
            else:
                box.append(
                    ipb.ToolCallResult(
                        tool_name=tool,
                        call_id=call_id,
                        error=ipb.ToolError(
                            code=ipb.TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE,
                            message=(
                                "the call was in flight when its session was handed over to "
                                "another dispatcher; it may or may not have run, and its tool is "
                                "not declared idempotent, so it was not issued again: retry it "
                                "if that is safe"
                            ),
                        ),
                    )
                )
            event.set()
        self._attached.set()

    @property
    def attached(self) -> bool:
        """Whether the session is attached to a dispatcher's stream."""
        return self._attached.is_set()

    async def wait_attached(self) -> None:
        """Wait until the session is attached again (or abandoned)."""
        await self._attached.wait()

    def abandon(self, reason: str) -> None:
        """Give the session up: the planner is cancelled, nothing more is sent."""
        if self.abandoned is not None:
            return
        self.abandoned = reason
        self._attached.set()
        self._cancel_planner()
        self.closed.set()

    def deliver_tool_result(self, result: ipb.ToolCallResult) -> bool:
        """Wake the tool call waiting for ``result.call_id``; False if none waits."""
        waiter = self._pending.get(result.call_id)
        if waiter is None:
            return False
        event, box, _ = waiter
        if not box:
            box.append(result)
            event.set()
        return True

    def deliver_user_input(self, user_input: ipb.UserInput) -> bool:
        """Queue an interjected message for the planner; False when the backlog is full."""
        try:
            self._ui_send.send_nowait(user_input)
        except anyio.WouldBlock:
            return False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return True  # the planner is gone; nothing left to tell
        return True

    def add_usage(self, delta: ipb.Usage) -> None:
        merge_usage(self._usage, delta)
        metrics = _metrics.current
        if metrics is not None:
            metrics.add_tokens(delta.model or "unknown", delta.input_tokens, delta.output_tokens)

    # --- tool calls (planner side) ---

    async def call_tool(self, tool_name: str, arguments_json: str) -> str:
        self._calls += 1
        call_id = f"{self._calls}-{uuid.uuid4().hex[:12]}"
        # The span's context goes with the request: the dispatcher's execute_tool
        # span is its child.
        with TRACER.start_as_current_span(
            f"tool_call {tool_name}",
            kind=SpanKind.CLIENT,
            attributes={"gen_ai.tool.name": tool_name, "gen_ai.tool.call.id": call_id},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            result = await self._call_tool(tool_name, arguments_json, call_id)
            if result.HasField("error"):
                code = tool_error_code_name(result.error.code)
                span.set_attribute("error.type", code)
                span.set_status(StatusCode.ERROR, result.error.message)
        if result.HasField("error"):
            raise tool_error_from_result(result)
        return result.result_json

    async def _call_tool(
        self, tool_name: str, arguments_json: str, call_id: str
    ) -> ipb.ToolCallResult:
        while True:
            result = await self._call_tool_once(tool_name, arguments_json, call_id)
            if result is not _REISSUE:
                if result.error.message.startswith("the call was in flight when its session"):
                    # Watchers learn that the call was lost, not only the planner.
                    await self._send(
                        Outgoing(
                            self._packet(
                                error=ipb.ErrorSignal(
                                    code=LOST_IN_HAND_OVER,
                                    message=f"tool call {call_id} ({tool_name}): "
                                    + result.error.message,
                                )
                            )
                        )
                    )
                return result
            # Lost in a hand-over, idempotent: the same call again, under a new id.
            await self._attached.wait()
            self._calls += 1
            previous, call_id = call_id, f"{self._calls}-{uuid.uuid4().hex[:12]}"
            _log.info(
                "session %s: tool call %s (%s) issued again as %s after the hand-over",
                self.session_id,
                previous,
                tool_name,
                call_id,
            )

    async def _call_tool_once(
        self, tool_name: str, arguments_json: str, call_id: str
    ) -> ipb.ToolCallResult:
        # A model's tool call, JSON-decoded, may hold lone surrogates.
        tool_name, arguments_json = valid_text(tool_name), valid_text(arguments_json)
        packet = self._packet(
            tool_call=ipb.ToolCallRequest(
                tool_name=tool_name,
                arguments_json=arguments_json,
                call_id=call_id,
                trace_context=inject(),
            )
        )
        if packet.ByteSize() > _MAX_PACKET_BYTES:
            raise InvalidToolArgumentsError(
                f"arguments of {len(arguments_json)} bytes exceed the message size limit",
                tool_name=tool_name,
                call_id=call_id,
            )
        event = anyio.Event()
        box: list[ipb.ToolCallResult] = []
        # Registered before the request goes out, so a fast answer is never missed;
        # removed in any case, so a stop abandons the wait and a late answer is ignored.
        self._pending[call_id] = (event, box, packet)
        try:
            await self._send(Outgoing(packet))
            await event.wait()
        finally:
            del self._pending[call_id]
        return box[0]

    # --- the coordinator ---

    async def run(self, tg: TaskGroup) -> None:
        """Run the planner to its end or until stopped; send the terminal packet."""
        # Current while the planner task starts, so that its spans are children.
        with TRACER.start_as_current_span(
            "session",
            context=self._trace_parent,
            kind=SpanKind.SERVER,
            attributes={
                "task.id": self.task_id,
                "session.id": self.session_id,
                "session.planner": self.ctx.planner,
                "slot.index": self._slot_index,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            self._span = span
            try:
                await self._run(tg)
            finally:
                span.set_attribute("session.outcome", self.outcome)
                if self.outcome not in ("SUCCESS", "STOPPED"):
                    span.set_status(StatusCode.ERROR, self.outcome)

    async def _run(self, tg: TaskGroup) -> None:
        started = time.monotonic()
        # Every log record of this task (and of the planner task started below,
        # which copies the context) carries the ids.
        ids = session_ids.set((self.task_id, self.session_id))
        _log.info(
            "session start task=%s session=%s planner=%s slot=%d",
            self.task_id,
            self.session_id,
            self.ctx.planner,
            self._slot_index,
        )
        try:
            tg.start_soon(self._run_planner)
            await self._wake.wait()
            if not self._planner_done.is_set():
                # A stop: the planner's scope is cancelled; give its cleanup (closing
                # the model stream) a bounded time, then answer the stop regardless.
                # Anything it still emits is dropped by the writer's gate.
                with anyio.move_on_after(self._cancel_timeout):
                    await self._planner_done.wait()
                if not self._planner_done.is_set():
                    _log.warning(
                        "session %s: planner still running %.1fs after the stop; abandoning it",
                        self.session_id,
                        self._cancel_timeout,
                    )
            self._terminal_started = True
            if self.abandoned is None:
                try:
                    for packet in self._terminal_packets():
                        await self._send(Outgoing(packet))
                    self.terminal_sent.set()
                except SessionAbandoned:
                    pass
            if self.abandoned is not None:
                self.outcome = "ABANDONED"
                _log.warning(
                    "session %s of task %s abandoned: %s; its task ends FAILURE on the "
                    "dispatcher once its hand-over window has passed",
                    self.session_id,
                    self.task_id,
                    self.abandoned,
                )
                return
            with anyio.move_on_after(self._closed_timeout):
                await self.closed.wait()
            if not self.closed.is_set():
                _log.warning(
                    "session %s: no SESSION_CLOSED within %.0fs",
                    self.session_id,
                    self._closed_timeout,
                )
        finally:
            self._ui_send.close()
            self.user_input_receiver.close()
            _log.info(
                "session end task=%s session=%s outcome=%s duration=%.2fs",
                self.task_id,
                self.session_id,
                self.outcome,
                time.monotonic() - started,
            )
            metrics = _metrics.current
            if metrics is not None:
                metrics.session_finished(
                    self.ctx.planner or "unknown", _OUTCOME_LABELS.get(self.outcome, "failure")
                )
            session_ids.reset(ids)

    async def _run_planner(self) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._planner_scope = scope
                if self.stop_requested:
                    scope.cancel()
                try:
                    await self._drive()
                except Exception as exc:
                    self._failure = exc
        finally:
            self._planner_done.set()
            self._wake.set()

    async def _drive(self) -> None:
        if isinstance(self._planner, Exception):
            raise self._planner
        produced = self._planner(self.ctx)
        if isinstance(produced, AsyncIterator):
            await self._drain(produced)
        elif inspect.isawaitable(produced):
            self._take_return(await produced)
        else:
            raise TypeError(
                f"planner returned {type(produced).__name__}, "
                "expected an async iterator or an awaitable"
            )

    async def _drain(self, outputs: AsyncIterator[PlannerOutput]) -> None:
        try:
            async for item in outputs:
                if isinstance(item, ipb.FinalResult):
                    self._final = item
                    break
                await self._emit(item)
        finally:
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                # GeneratorExit at the planner's yield runs its cleanup (closing the
                # model's HTTP stream) even when we are being cancelled.
                with anyio.move_on_after(self._cancel_timeout, shield=True):
                    await aclose()

    def _take_return(self, value: PlannerReturn) -> None:
        if isinstance(value, ipb.FinalResult):
            self._final = value
        elif isinstance(value, str):
            self._final = ipb.FinalResult(
                outcome=ipb.SESSION_OUTCOME_SUCCESS, result=valid_text(value)
            )
        elif value is not None:
            raise TypeError(f"planner returned {type(value).__name__}")

    async def _emit(self, item: PlannerOutput) -> None:
        scope = self._planner_scope
        if scope is not None and scope.cancel_called:
            # Stopped: the hand-over to the writer does not switch tasks (nor
            # see the cancellation) while its queue has room; end here.
            await anyio.lowlevel.checkpoint()
        if isinstance(item, str):
            item = ipb.ContentChunk(text=valid_text(item))
        if type(item) is ipb.ContentChunk:
            text = item.text
            if len(text) <= _CONTENT_PIECE_BYTES // 4:
                # The common case, kept short: at most 4 bytes a character, such
                # a chunk's packet is under the limit without measuring it.
                self._remember_answer(text)
                fold = self._fold
                if fold is not None and fold(text, item.is_finish):
                    return  # folded into the session's last packet, not yet written
                packet = ipb.UpstreamPacket(
                    session_id=self.session_id, timestamp=now_us(), content=item
                )
                await self._send(Outgoing(packet))
                return
        field = _FIELD_BY_TYPE.get(type(item))
        if field is None:
            raise TypeError(f"planner yielded {type(item).__name__}, which is not an output")
        if isinstance(item, ipb.ContentChunk):
            self._remember_answer(item.text)
        if isinstance(item, ipb.Usage):
            # Everything recorded so far goes out with it; if the hand-over is
            # cancelled before the writer took it, it stays recorded.
            self.add_usage(item)
            usage, self._usage = self._usage, ipb.Usage()
            out = Outgoing(self._packet(usage=usage))
            try:
                await self._send(out)
            except BaseException:
                if not out.taken:
                    merge_usage(self._usage, usage)
                raise
            return
        if isinstance(item, ipb.ContentChunk) and len(item.text) > _CONTENT_PIECE_BYTES // 4:
            pieces = split_text(item.text, _CONTENT_PIECE_BYTES)
            if len(pieces) > 1:
                # A huge chunk goes out as several, each under the limit;
                # is_finish stays on the last.
                for i, piece in enumerate(pieces):
                    last = i == len(pieces) - 1
                    chunk = ipb.ContentChunk(text=piece, is_finish=item.is_finish and last)
                    await self._send(Outgoing(self._packet(content=chunk)))
                return
        packet = self._packet(**{field: item})
        if packet.ByteSize() > _MAX_PACKET_BYTES:
            _log.warning(
                "session %s: dropped a %s of %d bytes (over the message size limit)",
                self.session_id,
                field,
                packet.ByteSize(),
            )
            packet = self._packet(
                error=ipb.ErrorSignal(
                    code="payload_too_large",
                    message=f"a {field} of {packet.ByteSize()} bytes exceeded the "
                    f"{_MAX_PACKET_BYTES}-byte message limit and was dropped",
                )
            )
        await self._send(Outgoing(packet))

    def _remember_answer(self, text: str) -> None:
        if self._answer_chars < _MAX_RESULT_CHARS:
            text = text[: _MAX_RESULT_CHARS - self._answer_chars]
            self._answer.append(text)
            self._answer_chars += len(text)

    def _packet(self, **payload: Any) -> ipb.UpstreamPacket:
        return ipb.UpstreamPacket(session_id=self.session_id, timestamp=now_us(), **payload)

    def _terminal_packets(self) -> list[ipb.UpstreamPacket]:
        usage, self._usage = self._usage, ipb.Usage()
        if self._stop is not None:
            self.outcome = "STOPPED"
            return [self._packet(stopped=ipb.Stopped(reason=self._stop.reason, final_usage=usage))]
        packets: list[ipb.UpstreamPacket] = []
        if not _usage_is_empty(usage):
            packets.append(self._packet(usage=usage))
        if self._local_stop is not None:
            result = ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_FAILURE, message=self._local_stop)
        elif self._failure is not None:
            code, message = _describe_failure(self._failure)
            if not isinstance(self._failure, CommanderError):
                _log.error(
                    "session %s: planner failed",
                    self.session_id,
                    exc_info=self._failure,
                )
            else:
                _log.warning("session %s: planner failed: %s", self.session_id, message)
            packets.append(self._packet(error=ipb.ErrorSignal(code=code, message=message)))
            result = ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_FAILURE, message=message)
        elif self._final is not None:
            result = ipb.FinalResult()
            result.CopyFrom(self._final)
            if result.outcome == ipb.SESSION_OUTCOME_UNSPECIFIED:
                result.outcome = ipb.SESSION_OUTCOME_SUCCESS
        else:
            # The answer's content already went out in chunks; the result
            # repeats at most what fits in one packet.
            answer = "".join(self._answer)
            pieces = split_text(answer, _CONTENT_PIECE_BYTES)
            result = ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result=pieces[0])
        packet = self._packet(result=result)
        if packet.ByteSize() > _MAX_PACKET_BYTES:
            # A planner's own result over the limit fails its session, with
            # the reason, instead of the slot's stream.
            message = (
                f"a result of {packet.ByteSize()} bytes exceeds the "
                f"{_MAX_PACKET_BYTES}-byte message limit"
            )
            _log.warning("session %s: %s", self.session_id, message)
            result = ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_FAILURE, message=message)
            packet = self._packet(result=result)
        self.outcome = ipb.SessionOutcome.Name(result.outcome).removeprefix("SESSION_OUTCOME_")
        packets.append(packet)
        return packets


def _describe_failure(exc: BaseException) -> tuple[str, str]:
    """ErrorSignal code and message for a planner's exception."""
    # valid_text: an exception's text may hold a file name's escaped bytes.
    if isinstance(exc, CommanderError):
        return exc.code, valid_text(str(exc)) or type(exc).__name__
    text = valid_text(str(exc))
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return "planner_error", message
