"""The bridge: our tasks become byclaw commands, the worker's output becomes our events.

One :class:`ByclawPlanner` per byclaw capability; the task's session runs it
like any planner. A task's life on Redis:

1. ``XGROUP CREATE`` our group on the session's data stream (session id
   ``agentdispatch-<task_id>``), then ``XADD`` an ``ASK_AGENT`` command to the
   capability's control stream;
2. ``XREADGROUP`` the data stream: chunks → ``ContentChunk``, states →
   ``StageChange`` (the SDK's own ``COMPLETED`` / ``FAILED: …`` /
   ``CANCELLED`` end the task), artifacts → ``Artifact``; every entry is
   acked once read, a malformed one is logged and acked too;
3. meanwhile, once a worker took the command (``XPENDING`` names it), a no-op
   ``CANCEL_TASK`` probe goes to its control stream every ``probe_interval``;
   the SDK's control loop acks it at once. A probe unacked for
   ``worker_timeout`` means the worker is gone (kill -9) or its event loop is
   stuck: the task ends FAILURE with that reason, the command is acked and
   the SDK's execution record set to ``FAILED``;
4. a command no worker took within ``queue_timeout`` is deleted (atomically,
   only if still undelivered) and the task ends FAILURE;
5. our stop (the planner cancelled) → a ``CANCEL_TASK`` to the worker that
   holds the command (or the undelivered command deleted), within
   ``cancel_timeout``; nothing is relayed after the stop.

:class:`ByclawBridge` adds the capability discovery (the SDK's worker
registry) and a janitor for the SDK's leak: an entry its worker cannot parse
is logged and left pending forever; the janitor acks it.

This module must not import ``byclaw_gateway_sdk`` (Python 3.12+, its own
venv): the format lives in :mod:`commander.byclaw._protocol`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aredis
from redis.exceptions import RedisError, ResponseError

from commander._commander import Commander
from commander._connection import ConnectionConfig
from commander._context import PlannerOutput, SessionContext
from commander._errors import CommanderError
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._planners import PlannerRegistry
from commander.byclaw import _protocol as proto

_log = logging.getLogger("commander.byclaw")

# Deletes a command from a control stream only if no consumer holds it
# (XPENDING empty, or no group at all): then no worker has read it, and none will.
_DEL_IF_UNDELIVERED = """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if type(p) == 'table' and p.err == nil and #p > 0 then return 0 end
return redis.call('XDEL', KEYS[1], ARGV[2])
"""


class ByclawError(CommanderError):
    """The byclaw worker reported a failure, or could not be reached."""

    code = "byclaw_error"


class ByclawTaskFailedError(ByclawError):
    """The worker ended the task ``FAILED`` (its ``process_command`` raised)."""

    code = "byclaw_task_failed"


class ByclawWorkerLostError(ByclawError):
    """The worker holding the task stopped answering (died, or its loop is stuck)."""

    code = "byclaw_worker_lost"


class ByclawNoWorkerError(ByclawError):
    """No worker took the task within the queue timeout."""

    code = "byclaw_no_worker"


@dataclass(frozen=True)
class ByclawSettings:
    """How the bridge talks to byclaw workers (every bound documented in docs/operations.md)."""

    #: ``redis://host:port/db`` of the Redis the workers use.
    redis_url: str
    #: The workers' consumer group (``run_worker(consumer_group=...)``).
    worker_group: str = proto.DEFAULT_WORKER_GROUP
    #: A probe unacked this long → the worker is lost → FAILURE.
    worker_timeout: float = 10.0
    #: How often a probe goes out (and the command's holder is looked up).
    probe_interval: float = 1.0
    #: A command no worker took within this → deleted, FAILURE.
    queue_timeout: float = 30.0
    #: After our stop, how long sending the cancel may take (inside the
    #: session's STOP_CANCEL_TIMEOUT of 1.5 s).
    cancel_timeout: float = 1.0
    #: The janitor's period, and how long an entry must have been pending
    #: before the janitor looks at it.
    janitor_interval: float = 2.0
    janitor_min_idle: float = 1.0


def _redis(url: str) -> aredis.Redis:
    return aredis.Redis.from_url(url, decode_responses=True)


#: A failure the worker reported: the error class and what it said.
_Failure = tuple[type[ByclawError], str]


class ByclawPlanner:
    """The planner for one byclaw capability (planner name = the capability)."""

    def __init__(self, settings: ByclawSettings, capability: str, client: aredis.Redis) -> None:
        self.settings = settings
        self.capability = capability
        self._r = client

    def __call__(self, ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
        return _TaskRun(self, ctx).run()


class _TaskRun:
    """One task's round trip through Redis."""

    def __init__(self, planner: ByclawPlanner, ctx: SessionContext) -> None:
        self.s = planner.settings
        self.cap = planner.capability
        self.r = planner._r
        self.ctx = ctx
        self.session_id = f"agentdispatch-{ctx.task_id}"
        self.message_id = f"msg-{ctx.task_id}"
        self.ctrl = proto.ctrl_stream(self.cap)
        self.data = proto.session_data_stream(self.session_id)
        self.entry_id = ""
        self.worker = ""
        self.terminal = False
        self.seen_data = False
        self.submitted_at = 0.0
        self.next_check = 0.0
        self.probe: tuple[str, float] | None = None
        self.log = ctx.logger

    async def run(self) -> AsyncIterator[PlannerOutput]:
        try:
            await self._submit()
            while not self.terminal:
                outputs, failure = await self._poll()
                for out in outputs:
                    yield out
                if failure is not None:
                    cls, detail = failure
                    if not self.worker:
                        with contextlib.suppress(RedisError):
                            self.worker = await self._holder()
                    raise cls(f"byclaw worker {self.worker or '?'} {detail}")
                if not self.terminal and time.monotonic() >= self.next_check:
                    self.next_check = time.monotonic() + self.s.probe_interval
                    await self._check_liveness()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.s.cancel_timeout):
                if not self.terminal and self.entry_id:
                    # Stopped (or failed on our side): the worker must stop too.
                    await self._cancel_remote()
                await self._drop_probe()

    # -------------------------------------------------------------- submit

    async def _submit(self) -> None:
        extra = {
            "input": self.ctx.instruction,
            "agentdispatch": {"task_id": self.ctx.task_id, "labels": dict(self.ctx.labels)},
        }
        try:
            payload = proto.ask_agent_payload(
                capability=self.cap,
                message_id=self.message_id,
                session_id=self.session_id,
                content=self.ctx.instruction,
                extra_payload=extra,
                tenant_id=self.ctx.labels.get("tenant", ""),
            )
        except ValueError as exc:
            raise ByclawError(f"cannot send to a byclaw worker: {exc}") from None
        try:
            await self.r.xgroup_create(self.data, proto.BRIDGE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # The SDK expires a data stream 7 days after each write; a worker that
        # never writes must not leave our empty stream for ever.
        await self.r.expire(self.data, proto.SESSION_TTL)
        self.entry_id = str(await self.r.xadd(self.ctrl, payload))  # type: ignore[arg-type]
        self.submitted_at = time.monotonic()
        self.next_check = self.submitted_at + self.s.probe_interval
        self.log.info(
            "byclaw: sent %s as %s to %s (entry %s)",
            self.ctx.task_id,
            self.message_id,
            self.ctrl,
            self.entry_id,
        )

    # -------------------------------------------------------------- relay

    async def _poll(self) -> tuple[list[PlannerOutput], _Failure | None]:
        """Reads (and acks) what the worker emitted: our outputs, and the
        failure that ends the task after them, if any."""
        block_ms = max(1, int(self.s.probe_interval * 1000))
        res: Any = await self.r.xreadgroup(
            proto.BRIDGE_GROUP, "bridge", {self.data: ">"}, count=256, block=block_ms
        )
        outputs: list[PlannerOutput] = []
        ids: list[str] = []
        failure: _Failure | None = None
        for _stream, entries in res or []:
            for entry_id, fields in entries:
                ids.append(entry_id)
                if failure is not None or self.terminal:
                    continue  # after the end: acked, not relayed
                try:
                    ev = proto.parse_data_entry(fields or {})
                except proto.MalformedEntryError as exc:
                    self.log.warning(
                        "byclaw: malformed entry %s on %s acked and skipped: %s",
                        entry_id,
                        self.data,
                        exc,
                    )
                    continue
                if ev.message_id != self.message_id:
                    continue
                self.seen_data = True
                failure = self._relay(ev, outputs)
        if ids:
            await self.r.xack(self.data, proto.BRIDGE_GROUP, *ids)
        if failure is not None:
            self.terminal = True
        return outputs, failure

    def _relay(self, ev: proto.DataEvent, outputs: list[PlannerOutput]) -> _Failure | None:
        if ev.kind == "chunk":
            if ev.content:
                outputs.append(ipb.ContentChunk(text=ev.content))
        elif ev.kind == "reasoning":
            outputs.append(ipb.ThoughtChain(step_name="reasoning", delta=ev.content))
        elif ev.kind == "artifact":
            for url in ev.urls:
                outputs.append(ipb.Artifact(kind="file", uri=url, description=url))
        elif ev.kind == "state":
            state = ev.content
            if state == proto.STATE_COMPLETED:
                self.terminal = True
            elif state == proto.STATE_FAILED or state.startswith(proto.STATE_FAILED + ":"):
                reason = state.partition(":")[2].strip() or "no reason given"
                return ByclawTaskFailedError, f"failed the task: {reason}"
            elif state == proto.STATE_CANCELLED:
                return ByclawError, "cancelled the task (not at our request)"
            elif state != proto.STATE_CANCELLING:
                outputs.append(ipb.StageChange(stage="worker_state", message=state))
        else:
            outputs.append(
                ipb.ThoughtChain(step_name=f"{ev.event_type}/{ev.content_type}", delta=ev.content)
            )
        return None

    # -------------------------------------------------------------- liveness

    async def _holder(self) -> str:
        """The consumer (worker id) that holds our command, or ""."""
        pend: Any = await self.r.xpending_range(
            self.ctrl, self.s.worker_group, min=self.entry_id, max=self.entry_id, count=1
        )
        if pend:
            return str(pend[0]["consumer"])
        record = await self._execution()
        return str(record.get("worker_id", "")) if record else ""

    async def _execution(self) -> dict[str, Any] | None:
        """The SDK's execution record of our command (``save_execution``), if any."""
        reg = proto.session_registry(self.session_id)
        exec_id: Any = await self.r.hget(reg, f"msg_map:{self.message_id}")
        if not exec_id:
            return None
        raw: Any = await self.r.hget(reg, f"exec:{exec_id}")
        try:
            record = json.loads(raw) if raw else None
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    async def _set_execution_status(self, status: str) -> None:
        record = await self._execution()
        if record is None:
            return
        record["status"] = status
        record["finished_at"] = record["updated_at"] = int(time.time() * 1000)
        await self.r.hset(
            proto.session_registry(self.session_id),
            f"exec:{record['execution_id']}",
            json.dumps(record, ensure_ascii=False),
        )

    async def _check_liveness(self) -> None:
        now = time.monotonic()
        if not self.worker:
            try:
                self.worker = await self._holder()
            except ResponseError:
                self.worker = ""  # NOGROUP: no worker ever created the group
            if self.worker:
                self.log.info("byclaw: %s taken by worker %s", self.message_id, self.worker)
            elif not self.seen_data and now - self.submitted_at > self.s.queue_timeout:
                removed: Any = await self.r.eval(
                    _DEL_IF_UNDELIVERED, 1, self.ctrl, self.s.worker_group, self.entry_id
                )
                if removed:
                    self.terminal = True
                    raise ByclawNoWorkerError(
                        f"no byclaw worker with capability {self.cap!r} took the task "
                        f"within {self.s.queue_timeout:g} s"
                    )
            if not self.worker:
                return
        wstream = proto.worker_ctrl_stream(self.worker)
        if self.probe is None:
            pid = await self.r.xadd(wstream, proto.probe_payload(self.worker))  # type: ignore[arg-type]
            self.probe = (str(pid), now)
            return
        pid, sent = self.probe
        if await self._acked(wstream, pid):
            await self.r.xdel(wstream, pid)
            self.probe = None
            return
        if now - sent > self.s.worker_timeout:
            self.terminal = True
            await self._give_up(wstream, pid)
            raise ByclawWorkerLostError(
                f"byclaw worker {self.worker} stopped answering: its control loop did not "
                f"acknowledge a probe for {self.s.worker_timeout:g} s (process gone or "
                "event loop stuck); the task was lost mid-run"
            )

    async def _acked(self, stream: str, entry_id: str) -> bool:
        try:
            pend: Any = await self.r.xpending_range(
                stream, self.s.worker_group, min=entry_id, max=entry_id, count=1
            )
            if pend:
                return False
            groups: Any = await self.r.xinfo_groups(stream)
        except ResponseError:
            return False
        for g in groups:
            if g.get("name") == self.s.worker_group:
                last = str(g.get("last-delivered-id", "0-0"))
                return proto.stream_id(last) >= proto.stream_id(entry_id)
        return False

    async def _give_up(self, wstream: str, probe_id: str) -> None:
        """The worker is lost: leave nothing behind that could run the task later."""
        try:
            await self.r.xack(self.ctrl, self.s.worker_group, self.entry_id)
            await self.r.xdel(wstream, probe_id)
            await self._set_execution_status("FAILED")
        except RedisError as exc:
            self.log.warning("byclaw: cleanup after a lost worker failed: %s", exc)

    # -------------------------------------------------------------- stop

    async def _drop_probe(self) -> None:
        """A probe still out when the task ends is removed (the stream stays small)."""
        if self.probe is None or not self.worker:
            return
        probe_id, self.probe = self.probe[0], None
        try:
            await self.r.xdel(proto.worker_ctrl_stream(self.worker), probe_id)
        except RedisError as exc:
            self.log.debug("byclaw: dropping probe %s: %s", probe_id, exc)

    async def _cancel_remote(self) -> None:
        try:
            if not self.worker:
                removed: Any = await self.r.eval(
                    _DEL_IF_UNDELIVERED, 1, self.ctrl, self.s.worker_group, self.entry_id
                )
                if removed:
                    self.log.info(
                        "byclaw: stop: %s withdrawn before a worker took it", self.message_id
                    )
                    return
                self.worker = await self._holder()
            if not self.worker:
                self.log.warning(
                    "byclaw: stop: no worker holds %s; nothing to cancel", self.message_id
                )
                return
            record = await self._execution()
            await self.r.xadd(
                proto.worker_ctrl_stream(self.worker),
                proto.cancel_task_payload(  # type: ignore[arg-type]
                    message_id=self.message_id,
                    session_id=self.session_id,
                    capability=self.cap,
                    worker_id=self.worker,
                    execution_id=str(record.get("execution_id", "")) if record else "",
                    reason="stopped by agentdispatch",
                ),
            )
            self.log.info("byclaw: stop: CANCEL_TASK sent to worker %s", self.worker)
        except RedisError as exc:
            self.log.warning("byclaw: stop: could not cancel %s: %s", self.message_id, exc)


# ------------------------------------------------------------------ discovery


async def live_workers(client: aredis.Redis) -> dict[str, list[str]]:
    """Registered workers whose id lock is held (the SDK refreshes it every loop,
    TTL 60 s) → their capabilities. The registry itself never forgets a worker
    killed with -9 (``unregister_worker`` is never called); the lock expires."""
    out: dict[str, list[str]] = {}
    ids: Any = await client.zrange(proto.ACTIVE_WORKERS, 0, -1)
    for wid in ids:
        if not await client.exists(proto.worker_lock(str(wid))):
            continue
        caps: Any = await client.smembers(proto.worker_capabilities(str(wid)))
        out[str(wid)] = sorted(str(c) for c in caps)
    return out


async def discover_capabilities(client: aredis.Redis, wait: float) -> list[str]:
    """The capabilities of the live workers, waiting up to ``wait`` seconds for one."""
    with anyio.move_on_after(wait):
        while True:
            workers = await live_workers(client)
            caps = sorted({c for cs in workers.values() for c in cs})
            if caps:
                _log.info("byclaw: live workers %s", workers)
                return caps
            await anyio.sleep(0.2)
    raise ByclawError(f"no live byclaw worker registered on Redis within {wait:g} s")


async def sweep_malformed(
    client: aredis.Redis, settings: ByclawSettings, caps: Sequence[str]
) -> int:
    """Acks the control entries the workers hold but could never parse; returns how many.

    The SDK's worker logs such an entry and leaves it pending (no XACK) for
    ever. Only entries pending longer than ``janitor_min_idle`` are looked at
    (a worker parses an entry as soon as it reads it)."""
    acked = 0
    for cap in caps:
        stream = proto.ctrl_stream(cap)
        try:
            pend: Any = await client.xpending_range(
                stream,
                settings.worker_group,
                min="-",
                max="+",
                count=100,
                idle=int(settings.janitor_min_idle * 1000),
            )
        except ResponseError:
            continue  # no group yet
        for p in pend:
            entry_id = str(p["message_id"])
            entries: Any = await client.xrange(stream, entry_id, entry_id)
            problem = (
                "entry deleted while pending"
                if not entries
                else proto.command_problem(dict(entries[0][1] or {}))
            )
            if problem is None:
                continue
            await client.xack(stream, settings.worker_group, entry_id)
            acked += 1
            _log.warning(
                "byclaw: malformed entry %s on %s (held by %s) acked: %s",
                entry_id,
                stream,
                p.get("consumer", "?"),
                problem,
            )
    return acked


# ------------------------------------------------------------------ the bridge


class ByclawBridge:
    """A commander whose planners are the byclaw workers' capabilities.

    ::

        bridge = ByclawBridge(ByclawSettings("redis://127.0.0.1:6379/0"), "127.0.0.1:50051")
        await bridge.run()       # until bridge.shutdown()
    """

    def __init__(
        self,
        settings: ByclawSettings,
        connection: ConnectionConfig | str,
        *,
        slots: int = 4,
        commander_id: str | None = None,
        capabilities: Sequence[str] = (),
        discover_timeout: float = 30.0,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.slots = slots
        self.commander_id = commander_id
        self.capabilities = list(capabilities)
        self.discover_timeout = discover_timeout
        self.labels = {"byclaw": "true", **(labels or {})}
        self.commander: Commander | None = None
        self._stop = anyio.Event()

    def _planners(self, client: aredis.Redis, caps: Sequence[str]) -> PlannerRegistry:
        registry = PlannerRegistry()
        for cap in caps:
            try:
                registry.register(cap, ByclawPlanner(self.settings, cap, client))
            except ValueError:
                _log.warning("byclaw: capability %r is not a valid planner name; skipped", cap)
        if not len(registry):
            raise ByclawError(f"no usable byclaw capability among {list(caps)}")
        return registry

    async def run(self) -> None:
        client = _redis(self.settings.redis_url)
        try:
            caps = self.capabilities or await discover_capabilities(client, self.discover_timeout)
            planners = self._planners(client, caps)
            self.commander = Commander(
                self.connection,
                slots=self.slots,
                commander_id=self.commander_id,
                labels=self.labels,
                planners=planners,
            )
            _log.info(
                "byclaw bridge: serving %s from %s", planners.names(), self.settings.redis_url
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._janitor, client, planners.names())
                if self._stop.is_set():
                    await self.commander.shutdown()
                await self.commander.run()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def _janitor(self, client: aredis.Redis, caps: Sequence[str]) -> None:
        while True:
            try:
                await sweep_malformed(client, self.settings, caps)
            except RedisError as exc:
                _log.warning("byclaw: janitor: %s", exc)
            await anyio.sleep(self.settings.janitor_interval)

    async def shutdown(self) -> None:
        self._stop.set()
        if self.commander is not None:
            await self.commander.shutdown()
