"""The ``a2a`` planner: runs a task on a remote A2A agent and relays its stream.

The remote agent (an A2A v1.0 server, reached with the official ``a2a-sdk``
client over the binding its card prefers) gets the task's instruction as a
message; its stream becomes our events, so the dispatcher's policies, budgets,
deadline and stops police it as they police our own planners:

* artifact text parts → ``ContentChunk`` (``lastChunk`` → ``is_finish``),
  file parts → ``Artifact``;
* a WORKING status with a message → ``StageChange("working", text)``;
  INPUT_REQUIRED → ``StageChange("call_user", text)``, and the next user
  message (``Interject``) is sent to the remote task, whose next stream is
  relayed in turn;
* COMPLETED → ``FinalResult`` SUCCESS (the answer is the streamed text);
  FAILED, REJECTED, CANCELED → FAILURE with the remote message.

Which agent: the task's label ``a2a_agent`` (a base URL), which must be one of
``A2ASettings.allowed_agents`` (``--a2a-agents``); without the label, the first
of them. A URL not on the list fails the session before any request: a client
must not make the commander connect anywhere it likes.

Stopping: when the session is stopped (a client cancel, a policy, a budget,
the deadline), the cancellation reaches this generator inside the stream's
read or at a ``yield``; the ``finally`` then sends ``CancelTask`` for the
remote task and closes the stream, under a shielded scope bounded by
``REMOTE_CANCEL_TIMEOUT`` (inside ``STOP_CANCEL_TIMEOUT``, so ``stopped``
follows in time). It must not leave the remote task running after our stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, cast

import anyio
import httpx

from commander._context import PlannerOutput, SessionContext
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._text import valid_text
from commander._timeouts import STOP_CANCEL_TIMEOUT

if TYPE_CHECKING:
    from a2a.client.client import Client
    from a2a.types.a2a_pb2 import StreamResponse

_log = logging.getLogger("commander.a2a")

#: Label naming the remote agent's base URL.
AGENT_LABEL = "a2a_agent"
#: CancelTask and closing the stream after our stop (inside STOP_CANCEL_TIMEOUT).
REMOTE_CANCEL_TIMEOUT = 1.0
assert REMOTE_CANCEL_TIMEOUT < STOP_CANCEL_TIMEOUT


@dataclasses.dataclass(frozen=True)
class A2ASettings:
    """The a2a planner's allowed remote agents and limits."""

    #: Base URLs of the agents a task may name (``--a2a-agents``); the first is the default.
    allowed_agents: tuple[str, ...] = ()
    #: Bearer token sent to the remote agents, if they need one.
    token: str = dataclasses.field(default="", repr=False)
    #: Seconds to wait for the next streamed event.
    read_timeout: float = 300.0


def parse_agents(text: str | Iterable[str]) -> tuple[str, ...]:
    """Comma-separated (or listed) agent base URLs, without trailing slashes."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(u.strip().rstrip("/") for u in items if u.strip())


class A2AError(Exception):
    """The remote agent cannot be used for this task."""


def pick_agent(settings: A2ASettings, labels: dict[str, str] | Any) -> str:
    """The agent URL for a task: its label, checked against the allowed list."""
    if not settings.allowed_agents:
        raise A2AError("no remote A2A agents are configured (--a2a-agents)")
    wanted = str(labels.get(AGENT_LABEL, "")).strip().rstrip("/")
    if not wanted:
        return settings.allowed_agents[0]
    if wanted not in settings.allowed_agents:
        raise A2AError(f"remote agent {wanted!r} is not on --a2a-agents")
    return wanted


class A2APlanner:
    """Planner factory: ``PlannerRegistry({"a2a": A2APlanner(settings)})``."""

    def __init__(self, settings: A2ASettings) -> None:
        self.settings = settings

    def __call__(self, ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
        return self._run(ctx)

    async def _run(self, ctx: SessionContext) -> AsyncGenerator[PlannerOutput, None]:
        from a2a.client import ClientConfig, ClientFactory

        try:
            url = pick_agent(self.settings, ctx.labels)
        except A2AError as exc:
            yield ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_FAILURE, message=str(exc))
            return
        headers = {"Authorization": f"Bearer {self.settings.token}"} if self.settings.token else {}
        timeout = httpx.Timeout(30.0, read=self.settings.read_timeout)
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as hc:
            import grpc

            def channel(target: str) -> Any:
                return grpc.aio.insecure_channel(target)

            factory = ClientFactory(
                ClientConfig(streaming=True, httpx_client=hc, grpc_channel_factory=channel)
            )
            client = await factory.create_from_url(url)
            async with client:
                async for out in self._relay(ctx, client, url):
                    yield out

    async def _relay(
        self, ctx: SessionContext, client: Client, url: str
    ) -> AsyncGenerator[PlannerOutput, None]:
        from a2a.types.a2a_pb2 import (
            CancelTaskRequest,
            Message,
            Part,
            Role,
            SendMessageRequest,
        )

        relay = _Relay()
        text = ctx.instruction
        remote_task = ""
        try:
            while True:
                msg = Message(
                    message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[Part(text=text)]
                )
                if remote_task:
                    msg.task_id = remote_task
                    msg.context_id = relay.context_id
                # An async generator (closed below as soon as we leave it).
                stream = cast(
                    "AsyncGenerator[StreamResponse, None]",
                    client.send_message(SendMessageRequest(message=msg)),
                )
                async with contextlib.aclosing(stream):
                    async for ev in stream:
                        for out in relay.take(ev):
                            yield out
                        if relay.task_id and not remote_task:
                            remote_task = relay.task_id
                            ctx.logger.info("remote task %s at %s", remote_task, url)
                        if relay.waiting or relay.final is not None:
                            break
                if relay.final is not None:
                    yield relay.final
                    return
                if not relay.waiting:
                    yield ipb.FinalResult(
                        outcome=ipb.SESSION_OUTCOME_FAILURE,
                        message="the remote agent's stream ended before its task did",
                    )
                    return
                # INPUT_REQUIRED: the user's next message goes to the remote task.
                relay.waiting = False
                answer = await ctx.user_inputs.receive()
                text = answer.text
        finally:
            if remote_task and relay.final is None:
                # Our stop (or an error): the remote task must stop too.
                with anyio.move_on_after(REMOTE_CANCEL_TIMEOUT, shield=True):
                    try:
                        await client.cancel_task(CancelTaskRequest(id=remote_task))
                        _log.info("remote task %s cancelled", remote_task)
                    except Exception as exc:  # ended meanwhile, or unreachable
                        _log.warning("cancel of remote task %s: %s", remote_task, exc)


_STATE_NAMES = {
    3: "completed",
    4: "failed",
    5: "canceled",
    7: "rejected",
}


class _Relay:
    """Turns one remote task's stream responses into planner outputs."""

    def __init__(self) -> None:
        self.task_id = ""
        self.context_id = ""
        self.answer: list[str] = []
        self.final: ipb.FinalResult | None = None
        self.waiting = False

    def take(self, ev: StreamResponse) -> list[PlannerOutput]:
        from a2a.types.a2a_pb2 import TaskState

        kind = ev.WhichOneof("payload")
        out: list[PlannerOutput] = []
        if kind == "task":
            self.task_id, self.context_id = ev.task.id, ev.task.context_id
            self._status(ev.task.status, out, TaskState)
        elif kind == "status_update":
            self._status(ev.status_update.status, out, TaskState)
        elif kind == "artifact_update":
            a = ev.artifact_update
            for p in a.artifact.parts:
                which = p.WhichOneof("content")
                if which == "text":
                    self.answer.append(p.text)
                    out.append(ipb.ContentChunk(text=valid_text(p.text), is_finish=a.last_chunk))
                elif which == "raw":
                    out.append(
                        ipb.Artifact(
                            kind=a.artifact.name or "file",
                            mime_type=p.media_type,
                            data=p.raw,
                            description=a.artifact.description,
                        )
                    )
                elif which == "url":
                    out.append(
                        ipb.Artifact(
                            kind=a.artifact.name or "file", mime_type=p.media_type, uri=p.url
                        )
                    )
        elif kind == "message":
            text = "".join(p.text for p in ev.message.parts if p.WhichOneof("content") == "text")
            self.answer.append(text)
            out.append(ipb.ContentChunk(text=valid_text(text), is_finish=True))
            self.final = ipb.FinalResult(
                outcome=ipb.SESSION_OUTCOME_SUCCESS, result=valid_text("".join(self.answer))
            )
        return out

    def _status(self, status: Any, out: list[PlannerOutput], states: Any) -> None:
        text = "".join(p.text for p in status.message.parts if p.WhichOneof("content") == "text")
        state = status.state
        if state == states.TASK_STATE_COMPLETED:
            self.final = ipb.FinalResult(
                outcome=ipb.SESSION_OUTCOME_SUCCESS,
                result=valid_text("".join(self.answer)),
                message=valid_text(text),
            )
        elif state in (
            states.TASK_STATE_FAILED,
            states.TASK_STATE_CANCELED,
            states.TASK_STATE_REJECTED,
        ):
            name = _STATE_NAMES.get(int(state), "ended")
            self.final = ipb.FinalResult(
                outcome=ipb.SESSION_OUTCOME_FAILURE,
                message=valid_text(
                    f"remote task {name}: {text}" if text else f"remote task {name}"
                ),
            )
        elif state in (states.TASK_STATE_INPUT_REQUIRED, states.TASK_STATE_AUTH_REQUIRED):
            self.waiting = True
            out.append(
                ipb.StageChange(stage="call_user", message=valid_text(text or "input required"))
            )
        elif state == states.TASK_STATE_WORKING and text:
            out.append(ipb.StageChange(stage="working", message=valid_text(text)))
