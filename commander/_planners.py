"""Planners and the registry that maps ``StartSession.planner`` names to them.

A planner is called once per session with the session's
:class:`~commander.SessionContext` and returns either

* an async iterator (typically an ``async def`` generator) of upstream
  payloads — ``ThoughtChain``, ``ContentChunk``, ``Usage``, ``StageChange``,
  ``Artifact``, ``ErrorSignal`` or a final ``FinalResult`` (a plain ``str`` is
  shorthand for a ``ContentChunk``), or
* an awaitable whose return value (a ``str`` answer or a ``FinalResult``) is
  the session's result.

Tool calls do not go through the iterator: ``await ctx.call_tool(...)``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeAlias, overload

from commander._errors import PlannerNotFoundError
from commander._gen.dispatch.v1 import interaction_pb2

if TYPE_CHECKING:
    from commander._session import SessionContext

#: What a planner may yield.
PlannerOutput: TypeAlias = (
    interaction_pb2.ThoughtChain
    | interaction_pb2.ContentChunk
    | interaction_pb2.Usage
    | interaction_pb2.StageChange
    | interaction_pb2.Artifact
    | interaction_pb2.SandboxInUse
    | interaction_pb2.ErrorSignal
    | interaction_pb2.FinalResult
    | str
)

#: What a coroutine planner may return.
PlannerReturn: TypeAlias = interaction_pb2.FinalResult | str | None

#: A planner (factory): called once per session.
Planner: TypeAlias = Callable[
    ["SessionContext"], AsyncIterator[PlannerOutput] | Awaitable[PlannerReturn]
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class PlannerRegistry:
    """Planner names → planners. Each name becomes the capability ``planner:<name>``.

    ::

        planners = PlannerRegistry()

        @planners.register("echo")
        async def echo(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
            yield ContentChunk(text=ctx.instruction, is_finish=True)
    """

    def __init__(self, planners: Mapping[str, Planner] | None = None) -> None:
        self._planners: dict[str, Planner] = {}
        for name, planner in (planners or {}).items():
            self.register(name, planner)

    @overload
    def register(self, name: str) -> Callable[[Planner], Planner]: ...
    @overload
    def register(self, name: str, planner: Planner) -> Planner: ...

    def register(
        self, name: str, planner: Planner | None = None
    ) -> Planner | Callable[[Planner], Planner]:
        """Register ``planner`` under ``name``; without ``planner``, a decorator.

        Registering a name again replaces the earlier planner.
        """
        if not _NAME.match(name):
            raise ValueError(f"invalid planner name {name!r}")

        def add(p: Planner) -> Planner:
            self._planners[name] = p
            return p

        return add if planner is None else add(planner)

    def get(self, name: str) -> Planner:
        """The planner registered as ``name``; :class:`PlannerNotFoundError` if none."""
        try:
            return self._planners[name]
        except KeyError:
            raise PlannerNotFoundError(f"no planner named {name!r} on this commander") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._planners)

    def planners(self) -> list[Planner]:
        """Registered planners, in name order."""
        return [self._planners[name] for name in self.names()]

    def capabilities(self) -> list[str]:
        """``planner:<name>`` for every registered planner."""
        return [f"planner:{name}" for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._planners

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._planners)
