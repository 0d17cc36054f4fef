"""The registry that maps ``StartSession.planner`` names to planners.

What a planner is (``Planner``, ``PlannerOutput``) lives in
:mod:`commander._context`; this module only names them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import overload

from commander._context import Planner
from commander._errors import PlannerNotFoundError

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
