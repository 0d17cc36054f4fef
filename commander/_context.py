"""What a planner is and what it sees: :class:`SessionContext`, ``Planner`` and its outputs.

This module owns the planner-facing surface of a session and nothing of its
runtime. It must not import the runtime (``_session``, ``_slot``) nor the
registry (``_planners``): both import it. The runtime is reached through
:class:`SessionRuntime`, the few operations a context delegates.

A planner is called once per session with the session's
:class:`SessionContext` and returns either

* an async iterator (typically an ``async def`` generator) of upstream
  payloads — ``ThoughtChain``, ``ContentChunk``, ``Usage``, ``StageChange``,
  ``Artifact``, ``SandboxInUse``, ``ErrorSignal`` or a final ``FinalResult``
  (a plain ``str`` is shorthand for a ``ContentChunk``), or
* an awaitable whose return value (a ``str`` answer or a ``FinalResult``) is
  the session's result.

Tool calls do not go through the iterator: ``await ctx.call_tool(...)``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from commander._errors import InvalidToolArgumentsError
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.lybic.agent import agent_pb2

#: What a planner may yield.
PlannerOutput: TypeAlias = (
    ipb.ThoughtChain
    | ipb.ContentChunk
    | ipb.Usage
    | ipb.StageChange
    | ipb.Artifact
    | ipb.SandboxInUse
    | ipb.ErrorSignal
    | ipb.FinalResult
    | str
)

#: What a coroutine planner may return.
PlannerReturn: TypeAlias = ipb.FinalResult | str | None

#: A planner (factory): called once per session.
Planner: TypeAlias = Callable[
    ["SessionContext"], AsyncIterator[PlannerOutput] | Awaitable[PlannerReturn]
]


def merge_usage(into: ipb.Usage, delta: ipb.Usage) -> None:
    """Add ``delta`` to ``into`` (model and currency: the latest non-empty one)."""
    into.input_tokens += delta.input_tokens
    into.output_tokens += delta.output_tokens
    into.cost += delta.cost
    into.steps += delta.steps
    if delta.currency:
        into.currency = delta.currency
    if delta.model:
        into.model = delta.model


class SessionRuntime(Protocol):
    """What a :class:`SessionContext` asks of the session that runs it (internal)."""

    @property
    def session_id(self) -> str: ...

    @property
    def stop_requested(self) -> bool: ...

    @property
    def user_input_receiver(self) -> MemoryObjectReceiveStream[ipb.UserInput]: ...

    async def call_tool(self, tool_name: str, arguments_json: str) -> str: ...

    def add_usage(self, delta: ipb.Usage) -> None: ...


class SessionContext:
    """Everything a planner gets to know and do in its session.

    Attributes mirror ``StartSession``: ``task_id``, ``session_id``,
    ``instruction``, ``config`` (the resolved ``lybic.agent.CommonConfig``,
    secrets included), ``history``, ``tools``, ``deadline``, ``planner``,
    ``labels``, ``sandbox``, ``previous_task_id``, ``destroy_sandbox``,
    ``user_system_prompt`` (the client's addition to the planner's system
    prompt; see :meth:`system_prompt`).
    """

    def __init__(self, session: SessionRuntime, start: ipb.StartSession) -> None:
        self._session = session
        #: The raw ``StartSession``.
        self.start = start
        self.session_id: str = session.session_id
        self.task_id: str = start.task_id
        self.instruction: str = start.instruction
        self.config: agent_pb2.CommonConfig = start.config
        self.history: tuple[ipb.ConversationTurn, ...] = tuple(start.history)
        self.tools: tuple[ipb.ToolSpec, ...] = tuple(start.tools)
        self.planner: str = start.planner
        self.labels: Mapping[str, str] = dict(start.labels)
        self.sandbox: agent_pb2.Sandbox | None = (
            start.sandbox if start.HasField("sandbox") else None
        )
        self.previous_task_id: str = start.previous_task_id
        self.destroy_sandbox: bool = start.destroy_sandbox
        self.user_system_prompt: str = start.user_system_prompt
        self.deadline: dt.datetime | None = (
            start.deadline.ToDatetime(tzinfo=dt.UTC) if start.HasField("deadline") else None
        )
        #: Logger that prefixes the task and session ids.
        self.logger = logging.LoggerAdapter(
            logging.getLogger("commander.planner"),
            {"task_id": self.task_id, "session_id": self.session_id},
        )

    def system_prompt(self, own: str | None) -> str | None:
        """The system prompt a planner sends: its ``own`` with the client's
        ``user_system_prompt`` (seed 001) appended; None when both are empty."""
        parts = [p for p in (own, self.user_system_prompt) if p]
        return "\n\n".join(parts) if parts else None

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (may be negative), or None without one."""
        if self.deadline is None:
            return None
        return (self.deadline - dt.datetime.now(dt.UTC)).total_seconds()

    @property
    def stop_requested(self) -> bool:
        """True once the session has been told to stop (the planner is being cancelled)."""
        return self._session.stop_requested

    async def call_tool(self, tool_name: str, /, **arguments: Any) -> Any:
        """Call a brokered tool and return its decoded JSON result.

        Raises a :class:`~commander.ToolError` subclass when the dispatcher
        answers with an error (unknown tool, bad arguments, timeout, ...).
        """
        try:
            arguments_json = json.dumps(arguments)
        except (TypeError, ValueError) as exc:
            raise InvalidToolArgumentsError(
                f"arguments are not JSON-serialisable: {exc}", tool_name=tool_name
            ) from exc
        result_json = await self.call_tool_json(tool_name, arguments_json)
        if not result_json:
            return None
        try:
            return json.loads(result_json)
        except ValueError:
            return result_json

    async def call_tool_json(self, tool_name: str, arguments_json: str) -> str:
        """Call a brokered tool with raw JSON arguments; returns the raw JSON result."""
        return await self._session.call_tool(tool_name, arguments_json)

    @property
    def user_inputs(self) -> MemoryObjectReceiveStream[ipb.UserInput]:
        """Interjected user messages, in arrival order (``await ...receive()``, ``async for``)."""
        return self._session.user_input_receiver

    def drain_user_inputs(self) -> list[ipb.UserInput]:
        """The user messages that arrived so far and were not yet taken, without waiting."""
        taken: list[ipb.UserInput] = []
        while True:
            try:
                taken.append(self._session.user_input_receiver.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return taken

    def add_usage(
        self,
        usage: ipb.Usage | None = None,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost: float = 0.0,
        currency: str = "",
        steps: int = 0,
        model: str = "",
    ) -> None:
        """Record usage that has not been yielded as a ``Usage`` packet.

        It rides on the next yielded ``Usage``, or on the terminal packet
        (``stopped.final_usage`` after a stop). Safe to call from a planner's
        cancellation handler: it does not await.
        """
        delta = ipb.Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost=cost,
            currency=currency,
            steps=steps,
            model=model,
        )
        if usage is not None:
            merge_usage(delta, usage)
        self._session.add_usage(delta)
