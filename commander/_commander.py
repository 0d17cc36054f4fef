"""The commander: N slots to the dispatcher, plus optional in-process tool providers.

Started and stopped like a Temporal ``Worker``::

    commander = Commander("127.0.0.1:50051", slots=4)
    async with commander:          # runs in the background for the block
        ...
    # or: await commander.run() in one task, await commander.shutdown() in another
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup

from commander._chat import ChatPlanner, LLMSettings
from commander._connection import ConnectionConfig
from commander._context import Planner
from commander._errors import CommanderError
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._planners import PlannerRegistry
from commander._provider import ToolProvider
from commander._slot import Slot, SlotSettings
from commander._timeouts import (
    CLOSED_TIMEOUT,
    CONTENT_WINDOW,
    HANDOVER_BUFFER,
    HANDOVER_TIMEOUT,
    SHUTDOWN_GRACE,
    STOP_CANCEL_TIMEOUT,
)

_log = logging.getLogger("commander")


def _version() -> str:
    try:
        return importlib.metadata.version("agent-dispatch-commander")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


#: The installed package version, sent in every hello.
VERSION = _version()


def default_commander_id() -> str:
    """``<host>-<pid>``: stable for the process, distinct between processes."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Commander:
    """Dials the dispatcher, keeps ``slots`` ChatStreams open and runs planners on them.

    Args:
        connection: the dispatcher's address (``host:port``) or a full
            :class:`ConnectionConfig` (token, TLS, backoff).
        slots: how many sessions may run at once (one ChatStream each).
        commander_id: sent in the hello; defaults to ``<host>-<pid>``.
        labels: free-form labels sent in the hello, for scheduling rules.
        tenants: the tenants whose tasks this commander takes (names of the
            dispatcher's tenants file); empty: every tenant's. A commander
            that connects with a tenant's own commander token serves that
            tenant only, and must name no other here.
        planners: planner registry (or mapping); defaults to the ``chat``
            planner configured with ``llm``.
        llm: defaults of the chat planner (used when ``planners`` is None).
        capabilities: extra capabilities besides ``planner:<name>`` of each planner.
        tool_providers: providers to serve in-process on the same dispatcher.
        shutdown_grace: on shutdown, how long running sessions may go on before
            they are stopped.
        stop_cancel_timeout: after a stop, how long the planner's cleanup may
            take before ``stopped`` is sent anyway (longer than the planners'
            ``close_timeout``; every bound is listed in ``commander._timeouts``).
        closed_timeout: after a session's terminal packet, how long to wait for
            the dispatcher's acknowledgement.
        handover_timeout: how long a running session goes on without a
            dispatcher, waiting to re-attach, before it is abandoned (0: a
            session ends with its stream, no hand-over).
        handover_buffer: how many of a session's packets are kept until the
            dispatcher has recorded them (docs/protocol.md, "Session hand-over").
        content_window: the credit window: a session's content waits (folding
            into its packet still queued) while this many of its packets, or
            8 Ki characters of its content, are unacknowledged, so that
            ``stopped`` queues behind at most that; control never waits for
            credit (0: no window).
    """

    def __init__(
        self,
        connection: ConnectionConfig | str | None = None,
        *,
        slots: int = 4,
        commander_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        tenants: Sequence[str] = (),
        planners: PlannerRegistry | Mapping[str, Planner] | None = None,
        llm: LLMSettings | None = None,
        capabilities: Sequence[str] = (),
        tool_providers: Sequence[ToolProvider] = (),
        shutdown_grace: float = SHUTDOWN_GRACE,
        stop_cancel_timeout: float = STOP_CANCEL_TIMEOUT,
        closed_timeout: float = CLOSED_TIMEOUT,
        handover_timeout: float = HANDOVER_TIMEOUT,
        handover_buffer: int = HANDOVER_BUFFER,
        content_window: int = CONTENT_WINDOW,
    ) -> None:
        if content_window < 0:
            raise ValueError("content_window must be at least 0")
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if connection is None:
            connection = ConnectionConfig()
        elif isinstance(connection, str):
            connection = ConnectionConfig(target=connection)
        if planners is None:
            planners = PlannerRegistry({"chat": ChatPlanner(llm or LLMSettings())})
        elif not isinstance(planners, PlannerRegistry):
            planners = PlannerRegistry(planners)
        self.connection = connection
        self.commander_id = commander_id or default_commander_id()
        self.planners = planners
        self._tool_providers = tuple(tool_providers)
        capability_list = [*planners.capabilities(), *capabilities]
        self.hello = ipb.Hello(
            commander_id=self.commander_id,
            version=VERSION,
            capabilities=list(dict.fromkeys(capability_list)),
            labels=dict(labels or {}),
            tenants=list(dict.fromkeys(tenants)),
        )
        self._draining = anyio.Event()
        self._done = anyio.Event()
        self._running = False
        settings = SlotSettings(
            connection=connection,
            hello=self.hello,
            resolve_planner=self._resolve_planner,
            draining=self._draining,
            shutdown_grace=shutdown_grace,
            stop_cancel_timeout=stop_cancel_timeout,
            closed_timeout=closed_timeout,
            handover_buffer=handover_buffer,
            handover_timeout=handover_timeout,
            content_window=content_window,
        )
        self.slots = tuple(Slot(i, settings) for i in range(slots))
        self._bg: TaskGroup | None = None

    def _resolve_planner(self, name: str) -> Planner | Exception:
        try:
            return self.planners.get(name)
        except CommanderError as exc:
            return exc

    async def run(self) -> None:
        """Serve until :meth:`shutdown`; reconnects by itself whenever the dispatcher is away."""
        if self._running:
            raise CommanderError("Commander.run() is already running")
        self._running = True
        _log.info(
            "commander %s %s: %d slots to %s, capabilities %s",
            self.commander_id,
            VERSION,
            len(self.slots),
            self.connection.target,
            ",".join(self.hello.capabilities),
        )
        try:
            async with anyio.create_task_group() as providers:
                for provider in self._tool_providers:
                    providers.start_soon(provider.run, self.connection)
                async with anyio.create_task_group() as tg:
                    for slot in self.slots:
                        tg.start_soon(slot.run)
                # Slots are done (drained); tools may be needed until then.
                for provider in self._tool_providers:
                    providers.start_soon(provider.shutdown)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_planners()
            self._done.set()
            _log.info("commander %s stopped", self.commander_id)

    async def _close_planners(self) -> None:
        """Planners that hold resources (the chat planner's HTTP pool) release them."""
        for planner in self.planners.planners():
            aclose = getattr(planner, "aclose", None)
            if aclose is None:
                continue
            with anyio.move_on_after(2.0):
                try:
                    await aclose()
                except Exception:
                    _log.warning("closing planner %r failed", planner, exc_info=True)

    async def shutdown(self) -> None:
        """Stop taking work, let running sessions finish (bounded), and wait for run() to end."""
        self._draining.set()
        if self._running:
            await self._done.wait()

    async def wait_connected(self) -> None:
        """Wait until every slot has had its hello acknowledged (useful in tests)."""
        for slot in self.slots:
            await slot.wait_connected()

    async def __aenter__(self) -> Self:
        self._bg = anyio.create_task_group()
        await self._bg.__aenter__()
        self._bg.start_soon(self.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._bg is not None, "__aexit__ without __aenter__"
        bg, self._bg = self._bg, None
        if exc_type is not None:
            # The block failed or was cancelled: no grace, tear down now.
            self._draining.set()
            bg.cancel_scope.cancel()
            return await bg.__aexit__(exc_type, exc, tb)
        try:
            await self.shutdown()
        except BaseException as own:
            self._draining.set()
            bg.cancel_scope.cancel()
            if not await bg.__aexit__(type(own), own, own.__traceback__):
                raise
            return None
        return await bg.__aexit__(None, None, None)
