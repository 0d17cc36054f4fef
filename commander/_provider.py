"""Tool providers in Python: declare tools with a decorator, serve them to the dispatcher.

::

    provider = ToolProvider("text-tools")

    @provider.tool(description="SHA-256 of a text, hex encoded")
    async def sha256(text: str) -> dict[str, str]:
        return {"sha256": hashlib.sha256(text.encode()).hexdigest()}

    await provider.run(ConnectionConfig("127.0.0.1:50051", token=...))

The runtime dials ``ToolProviderService.Connect``, sends a hello with every
tool's JSON Schema, serves invocations concurrently (bounded), honours
``cancel`` and the invocation deadline, and reconnects with backoff when the
dispatcher goes away (the stream's lifecycle is :mod:`commander._stream`'s).
Functions may be ``async def`` or plain functions (run in a worker thread). A
:class:`~commander.ToolError` raised by a tool becomes an error result with its
code; any other exception is ``EXECUTION_FAILED``. While a tool runs,
:func:`current_call` says which task the call belongs to (and what the
dispatcher says that task was given), so a tool can keep tasks apart.
"""

from __future__ import annotations

import collections.abc
import contextvars
import dataclasses
import datetime as dt
import functools
import inspect
import json
import logging
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import anyio
import anyio.to_thread
from opentelemetry.trace import SpanKind, StatusCode

from commander._connection import ConnectionConfig, open_stream
from commander._errors import (
    CommanderError,
    InvalidToolArgumentsError,
    ToolError,
    ToolExecutionError,
    UnknownToolError,
)
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tools_pb2, tools_pb2_grpc
from commander._stream import ReconnectingStream, Stream, StreamEnded
from commander._text import valid_text
from commander._tracing import TRACER, extract
from commander._writer import StreamWriter

_log = logging.getLogger("commander.provider")

F = TypeVar("F", bound=Callable[..., Any])

#: A provider's stream: requests (hello, results) out, responses (invocations) in.
ProviderStream = Stream[tools_pb2.ConnectRequest, tools_pb2.ConnectResponse]

#: The largest result message when the dispatcher's welcome announces none
#: (an older dispatcher): its 4 MiB limit less 4 KiB for the envelope the
#: result travels on in.
DEFAULT_MAX_RESULT_BYTES = 4 * 1024 * 1024 - 4 * 1024

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
}


def _schema_for(annotation: Any) -> dict[str, Any]:
    """JSON Schema for a parameter annotation (the simple cases; {} means any)."""
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return {"type": "array", "items": _schema_for(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        variants = [_schema_for(a) for a in args]
        return {"anyOf": variants} if all(variants) else {}
    if annotation is type(None):
        return {"type": "null"}
    return {}


def schema_from_signature(fn: Callable[..., Any]) -> dict[str, Any]:
    """The arguments' JSON Schema, inferred from ``fn``'s signature and annotations."""
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ValueError(f"tool {fn.__name__}: parameter {param.name} must be passable by name")
        properties[param.name] = _schema_for(hints.get(param.name, Any))
        if param.default is param.empty:
            required.append(param.name)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


@dataclasses.dataclass(frozen=True)
class CallContext:
    """Whose call a tool is running: the dispatcher's word, from the invocation.

    A call made with :meth:`ToolProvider.call` and no context belongs to no task
    (``task_id`` empty) and was given nothing.
    """

    task_id: str = ""
    session_id: str = ""
    call_id: str = ""
    #: Sandboxes the task was given (``Invocation.sandbox_ids``): the client's
    #: or the previous task's, and the one its session reported in use.
    sandbox_ids: frozenset[str] = frozenset()
    #: The tenant the task belongs to (``Invocation.tenant``; "" the default
    #: tenant). A provider serves every tenant: what it keeps across tasks (files)
    #: it keeps apart by this.
    tenant: str = ""

    @classmethod
    def of(cls, invocation: tools_pb2.Invocation) -> CallContext:
        return cls(
            task_id=invocation.task_id,
            session_id=invocation.session_id,
            call_id=invocation.call_id,
            sandbox_ids=frozenset(s for s in invocation.sandbox_ids if s),
            tenant=invocation.tenant,
        )


_NO_TASK = CallContext()
_CURRENT: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "commander_tool_call", default=None
)


def current_call() -> CallContext:
    """The context of the tool call running in this task (or worker thread)."""
    return _CURRENT.get() or _NO_TASK


@dataclasses.dataclass(frozen=True)
class _Tool:
    spec: ipb.ToolSpec
    fn: Callable[..., Any]
    signature: inspect.Signature


class ToolProvider:
    """A set of tools served to the dispatcher over one ``Connect`` stream.

    Args:
        provider_id: sent in the hello (defaults to ``python-<first tool>``).
        labels: free-form labels sent in the hello.
        max_concurrency: invocations executed at once; more wait their turn.
        shutdown_grace: on :meth:`shutdown`, how long running invocations may finish.
    """

    def __init__(
        self,
        provider_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        max_concurrency: int = 16,
        shutdown_grace: float = 5.0,
    ) -> None:
        self.provider_id = provider_id
        self.labels = dict(labels or {})
        self._tools: dict[str, _Tool] = {}
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._shutdown_grace = shutdown_grace
        self._inflight: dict[str, anyio.CancelScope] = {}
        self._idle = anyio.Event()  # set while no invocation runs
        self._idle.set()
        self._cancelled: set[str] = set()
        self._draining = anyio.Event()
        self._done = anyio.Event()
        self._running = False
        #: Set while registered with a dispatcher (the welcome arrived).
        self.registered = anyio.Event()
        #: The largest result message the dispatcher accepts (its welcome's
        #: ``max_message_bytes``); a larger result is sent as an error.
        self.max_result_bytes = DEFAULT_MAX_RESULT_BYTES

    # --- registration ---

    @overload
    def tool(self, name: F, /) -> F: ...
    @overload
    def tool(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        side_effects: bool = False,
        timeout_ms: int = 0,
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        name: str | F | None = None,
        *,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        side_effects: bool = False,
        timeout_ms: int = 0,
    ) -> F | Callable[[F], F]:
        """Decorator: serve the function as a tool (see :meth:`add_tool`).

        Use it bare (``@provider.tool``) or with options (``@provider.tool("ns.name")``).
        """
        if callable(name):
            self.add_tool(name)
            return name

        def register(fn: F) -> F:
            self.add_tool(
                fn,
                name=name,
                description=description,
                parameters=parameters,
                side_effects=side_effects,
                timeout_ms=timeout_ms,
            )
            return fn

        return register

    def add_tool(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        side_effects: bool = False,
        timeout_ms: int = 0,
    ) -> None:
        """Serve ``fn`` as a tool.

        ``name`` defaults to the function's name, ``description`` to its
        docstring, ``parameters`` (a JSON Schema of the arguments object) to
        one inferred from the signature. ``side_effects`` tells the dispatcher
        the call changes the world (never retried blindly).
        """
        tool_name = name or fn.__name__
        if tool_name in self._tools:
            raise ValueError(f"tool {tool_name!r} is already registered")
        schema = dict(parameters) if parameters is not None else schema_from_signature(fn)
        doc = inspect.getdoc(fn) or ""
        spec = ipb.ToolSpec(
            name=tool_name,
            description=description if description is not None else doc.split("\n\n")[0],
            parameters_json_schema=json.dumps(schema),
            side_effects=side_effects,
            timeout_ms=timeout_ms,
        )
        self._tools[tool_name] = _Tool(spec=spec, fn=fn, signature=inspect.signature(fn))

    @property
    def specs(self) -> list[ipb.ToolSpec]:
        """The ToolSpecs sent in the hello."""
        return [tool.spec for tool in self._tools.values()]

    # --- execution ---

    async def call(
        self,
        tool_name: str,
        arguments: Mapping[str, Any],
        *,
        context: CallContext | None = None,
    ) -> Any:
        """Run a tool here and now (what an invocation does, minus the wire),
        as part of ``context``'s task (default: no task)."""
        tool = self._tools.get(tool_name)
        if tool is None:
            raise UnknownToolError(f"no tool named {tool_name!r}", tool_name=tool_name)
        try:
            tool.signature.bind(**arguments)
        except TypeError as exc:
            raise InvalidToolArgumentsError(str(exc), tool_name=tool_name) from exc
        token = _CURRENT.set(context or _NO_TASK)
        try:
            if inspect.iscoroutinefunction(tool.fn):
                return await tool.fn(**arguments)
            # to_thread copies this context: the worker sees the same call.
            run: Callable[[], Any] = functools.partial(tool.fn, **arguments)
            result = await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
            if inspect.isawaitable(result):
                return await result
            return result
        finally:
            _CURRENT.reset(token)

    async def _execute(self, invocation: tools_pb2.Invocation) -> tools_pb2.InvocationResult:
        def failed(code: ipb.ToolErrorCode.ValueType, message: str) -> tools_pb2.InvocationResult:
            # valid_text: a message built from a surrogate-escaped file name or an
            # API's error body would make the result impossible to build or send.
            return tools_pb2.InvocationResult(
                invocation_id=invocation.invocation_id,
                error=ipb.ToolError(code=code, message=valid_text(message)),
            )

        try:
            arguments = json.loads(invocation.arguments_json or "{}")
        except ValueError as exc:
            return failed(InvalidToolArgumentsError.error_code, f"arguments are not JSON: {exc}")
        if not isinstance(arguments, dict):
            return failed(InvalidToolArgumentsError.error_code, "arguments must be a JSON object")
        try:
            value = await self.call(
                invocation.tool_name, arguments, context=CallContext.of(invocation)
            )
        except ToolError as exc:
            return failed(exc.error_code, exc.message)
        except Exception as exc:
            _log.warning("tool %s failed", invocation.tool_name, exc_info=True)
            text = str(exc)
            return failed(
                ToolExecutionError.error_code,
                f"{type(exc).__name__}: {text}" if text else type(exc).__name__,
            )
        try:
            result_json = json.dumps(value)
        except (TypeError, ValueError) as exc:
            return failed(ToolExecutionError.error_code, f"result is not JSON-serialisable: {exc}")
        return tools_pb2.InvocationResult(
            invocation_id=invocation.invocation_id, result_json=result_json
        )

    async def _serve_invocation(
        self,
        invocation: tools_pb2.Invocation,
        writer: StreamWriter[tools_pb2.ConnectRequest],
    ) -> None:
        iid = invocation.invocation_id
        scope = anyio.CancelScope()
        if invocation.HasField("deadline"):
            deadline = invocation.deadline.ToDatetime(tzinfo=dt.UTC)
            remaining = (deadline - dt.datetime.now(dt.UTC)).total_seconds()
            scope.deadline = anyio.current_time() + remaining
        self._inflight[iid] = scope
        if self._idle.is_set():
            self._idle = anyio.Event()
        result: tools_pb2.InvocationResult | None = None
        # A child of the dispatcher's execute_tool span (see commander._tracing).
        with TRACER.start_as_current_span(
            f"execute_tool {invocation.tool_name}",
            context=extract(invocation.trace_context),
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": invocation.tool_name,
                "gen_ai.tool.call.id": invocation.call_id,
                "task.id": invocation.task_id,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                with scope:
                    async with self._limiter:
                        result = await self._execute(invocation)
            finally:
                self._inflight.pop(iid, None)
                if not self._inflight:
                    self._idle.set()
            if result is None or result.HasField("error"):
                span.set_status(
                    StatusCode.ERROR,
                    result.error.message if result else "no result: deadline or cancel",
                )
        if iid in self._cancelled:
            self._cancelled.discard(iid)
            _log.info("invocation %s (%s) cancelled", iid, invocation.tool_name)
            return  # the dispatcher no longer wants a result
        if result is None:  # the deadline passed
            result = tools_pb2.InvocationResult(
                invocation_id=iid,
                error=ipb.ToolError(code=ipb.TOOL_ERROR_CODE_TIMEOUT, message="deadline exceeded"),
            )
        message = self._bounded(tools_pb2.ConnectRequest(result=result), invocation.tool_name)
        try:
            await writer.write(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _bounded(
        self, message: tools_pb2.ConnectRequest, tool_name: str
    ) -> tools_pb2.ConnectRequest:
        """``message``, or an error result for its call when it is over the
        dispatcher's limit: one oversized result fails its call, never the stream."""
        size = message.ByteSize()
        if size <= self.max_result_bytes:
            return message
        _log.warning(
            "tool %s: result of %d bytes exceeds the limit of %d bytes; sent as an error",
            tool_name,
            size,
            self.max_result_bytes,
        )
        return tools_pb2.ConnectRequest(
            result=tools_pb2.InvocationResult(
                invocation_id=message.result.invocation_id,
                error=ipb.ToolError(
                    code=ToolExecutionError.error_code,
                    message=f"result of {size} bytes exceeds the limit of "
                    f"{self.max_result_bytes} bytes",
                ),
            )
        )

    # --- connection ---

    async def run(self, connection: ConnectionConfig | str | None = None) -> None:
        """Serve until :meth:`shutdown`, reconnecting with backoff whenever the stream ends."""
        if connection is None:
            connection = ConnectionConfig()
        elif isinstance(connection, str):
            connection = ConnectionConfig(target=connection)
        if not self._tools:
            raise CommanderError("a ToolProvider needs at least one tool")
        if self._running:
            raise CommanderError("ToolProvider.run() is already running")
        self._running = True
        conn = connection
        stream = ReconnectingStream[tools_pb2.ConnectRequest, tools_pb2.ConnectResponse](
            connection,
            name=f"provider {self._id()}",
            open_call=lambda channel: open_stream(
                tools_pb2_grpc.ToolProviderServiceStub(channel).Connect, conn
            ),
            receive=tools_pb2.ConnectResponse,
            handshake=functools.partial(self._handshake, connection),
            serve=self._read_loop,
            on_closed=self._on_closed,
            on_lost=self._report_lost,
            no_answer="no welcome in time",
        )
        try:
            await stream.run(self._draining, self._drain)
        finally:
            self._done.set()

    async def shutdown(self) -> None:
        """Stop serving: running invocations get ``shutdown_grace``, then are cancelled."""
        self._draining.set()
        if self._running:
            await self._done.wait()

    async def _drain(self) -> None:
        with anyio.move_on_after(self._shutdown_grace):
            while not self._idle.is_set():
                await self._idle.wait()

    def _id(self) -> str:
        return self.provider_id or f"python-{next(iter(self._tools), 'tools')}"

    async def _handshake(self, connection: ConnectionConfig, stream: ProviderStream) -> None:
        hello = tools_pb2.ProviderHello(
            provider_id=self._id(), tools=self.specs, labels=self.labels
        )
        await stream.writer.write(tools_pb2.ConnectRequest(hello=hello))
        first = await stream.read_first()
        if first.WhichOneof("msg") != "welcome":
            raise StreamEnded(f"expected welcome, got {first.WhichOneof('msg') or 'nothing'}")
        self.max_result_bytes = first.welcome.max_message_bytes or DEFAULT_MAX_RESULT_BYTES
        self.registered.set()
        _log.info(
            "provider %s registered %s at %s",
            self._id(),
            ", ".join(first.welcome.registered_tools),
            connection.target,
        )

    def _on_closed(self) -> None:
        self.registered = anyio.Event()

    def _report_lost(self, reason: str) -> None:
        if not self._draining.is_set():
            _log.warning("provider %s: stream lost (%s); reconnecting", self._id(), reason)

    async def _read_loop(self, stream: ProviderStream) -> None:
        while True:
            message = await stream.read()
            kind = message.WhichOneof("msg")
            if kind == "invoke":
                stream.tg.start_soon(self._serve_invocation, message.invoke, stream.writer)
            elif kind == "cancel":
                iid = message.cancel.invocation_id
                scope = self._inflight.get(iid)
                if scope is not None:
                    self._cancelled.add(iid)
                    scope.cancel()
            elif kind == "rejected":
                _log.warning(
                    "provider %s: dispatcher rejected the result of %s: %s",
                    self._id(),
                    message.rejected.invocation_id,
                    message.rejected.detail,
                )
            elif kind == "welcome":
                pass
            else:
                _log.warning("provider %s: ignoring an empty message", self._id())
