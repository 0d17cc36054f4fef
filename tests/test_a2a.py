"""The dispatcher's A2A server (internal/a2a) against the official Python a2a-sdk client.

Real processes: the dispatcher (A2A over JSON-RPC+SSE at /a2a on its HTTP
port and over gRPC on its gRPC port), a commander, a tool provider serving
`computer.click`, and a scripted model. Every A2A task runs the same script:
a short intro with a `computer.click` call, then STORY streamed one word a
chunk. A policy holds the click for tasks labelled `tenant: hold` (the
INPUT_REQUIRED round trip).

Each scenario runs on both bindings, and the events each gives are compared
after normalisation (consecutive chunks of one artifact joined: how the
commander batches chunks is timing, not protocol).
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import anyio
import grpc
import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.client.card_resolver import A2ACardResolver
from a2a.client.client import Client, ClientCallContext
from a2a.client.errors import A2AClientError
from a2a.types import a2a_pb2_grpc
from a2a.types.a2a_pb2 import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import (
    A2AError,
    InvalidParamsError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict

from tests._procs import wait_until
from tests.conftest import Stack
from tests.scripted import tool_call

pytestmark = pytest.mark.anyio

BINDINGS = ["JSONRPC", "GRPC"]
INTRO = "Let me click the button first."
STORY = (
    "Once upon a time the night operator of the old station walked to the vault "
    "and read the long list out loud while the radio kept humming softly and the "
    "rain went on falling over the empty yard until morning came at last"
)
RESUME_EXT = "urn:agentdispatch:a2a:stream-resume:v1"
SEQ = "dispatcher.seq"

POLICY = """\
version: 1
hold_timeout: 60s
rules:
  - id: hold-clicks
    when: tool_name.startsWith("computer.") && tenant == "hold"
    action: hold
    reason: a person must approve GUI actions
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    policy = module_stack.workdir / "a2a-policy.yaml"
    policy.write_text(POLICY)
    llm = module_stack.scripted(
        [
            {"content": INTRO, "tool_calls": [tool_call("computer.click", {"x": 1, "y": 2})]},
            {"content": STORY},
        ],
        tokens_per_sec=25,
    )
    d = module_stack.dispatcher("--policy-file", str(policy), "--http-listen", "127.0.0.1:0")
    http = http_addr(d.proc)
    module_stack.gui_provider(d)
    module_stack.commander(d, llm.base_url, slots=4, wait_slots=4)
    return SimpleNamespace(d=d, llm=llm, base=f"http://{http}")


def http_addr(proc: Any) -> str:
    """The HTTP API's address, from the dispatcher's log line."""

    def find() -> str | None:
        m = re.search(r'msg="http api serving" addr=(\S+)', proc.log_text())
        return m.group(1) if m else None

    addr = wait_until(find, 10, "http api serving", procs=[proc])
    assert addr
    return addr


@contextlib.asynccontextmanager
async def client_for(base: str, binding: str, *, streaming: bool = True) -> AsyncIterator[Client]:
    """An a2a-sdk client from the agent card at base, on binding; closed at exit
    (with the HTTP client it was given, which the SDK leaves to its owner)."""
    async with httpx.AsyncClient(timeout=60) as hc:
        factory = ClientFactory(
            ClientConfig(
                streaming=streaming,
                supported_protocol_bindings=[binding],
                use_client_preference=True,
                httpx_client=hc,
                grpc_channel_factory=grpc.aio.insecure_channel,
            )
        )
        client = await factory.create_from_url(base)
        async with client:
            yield client


def user_msg(
    text: str, *, task_id: str = "", context_id: str = "", **metadata: Any
) -> SendMessageRequest:
    msg = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[Part(text=text)])
    if task_id:
        msg.task_id = task_id
    if context_id:
        msg.context_id = context_id
    req = SendMessageRequest(message=msg)
    if metadata:
        req.metadata.update(metadata)
    return req


def seq_of(obj: Any) -> int:
    return int(obj.metadata[SEQ])


def kind(ev: StreamResponse) -> str:
    return str(ev.WhichOneof("payload"))


def normalise(events: list[StreamResponse]) -> list[tuple[Any, ...]]:
    """Events as comparable tuples; consecutive chunks of one artifact joined."""
    out: list[tuple[Any, ...]] = []
    for ev in events:
        k = kind(ev)
        if k == "task":
            out.append(("task", TaskState.Name(ev.task.status.state)))
        elif k == "status_update":
            out.append(("status", TaskState.Name(ev.status_update.status.state)))
        elif k == "artifact_update":
            a = ev.artifact_update
            text = "".join(p.text for p in a.artifact.parts)
            if (
                out
                and out[-1][0] == "artifact"
                and out[-1][1] == a.artifact.artifact_id
                and a.append
            ):
                prev = out[-1]
                out[-1] = ("artifact", prev[1], prev[2] + text, prev[3], a.last_chunk)
            else:
                out.append(("artifact", a.artifact.artifact_id, text, a.append, a.last_chunk))
        else:
            out.append((k,))
    return out


def artifact_text(task: Task, artifact_id: str) -> str:
    for a in task.artifacts:
        if a.artifact_id == artifact_id:
            return "".join(p.text for p in a.parts)
    raise AssertionError(f"no artifact {artifact_id} in {MessageToDict(task)}")


async def collect(stream: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    return [ev async for ev in stream]


# ------------------------------------------------------------------ card


async def test_agent_card_declares_what_is_served(env: SimpleNamespace) -> None:
    async with httpx.AsyncClient() as hc:
        card: AgentCard = await A2ACardResolver(hc, env.base).get_agent_card()
    by_binding = {i.protocol_binding: i for i in card.supported_interfaces}
    assert set(by_binding) == {"JSONRPC", "GRPC"}, card
    assert by_binding["JSONRPC"].url == env.base + "/a2a"
    assert by_binding["GRPC"].url.endswith(":" + env.d.addr.rsplit(":", 1)[1])
    assert all(i.protocol_version == "1.0" for i in card.supported_interfaces)
    assert card.capabilities.streaming
    assert not card.capabilities.push_notifications
    assert [e.uri for e in card.capabilities.extensions] == [RESUME_EXT]
    assert "chat" in [s.id for s in card.skills]
    assert not card.security_schemes  # no client token on this dispatcher


# ------------------------------------------------------------------ send, stream, get, list


async def run_stream(base: str, binding: str) -> list[StreamResponse]:
    async with client_for(base, binding) as client:
        events = await collect(client.send_message(user_msg("Tell me a story")))
        task_id = events[0].task.id
        got = await client.get_task(GetTaskRequest(id=task_id))
        assert got.status.state == TaskState.TASK_STATE_COMPLETED
        assert artifact_text(got, "answer-1") == INTRO
        assert artifact_text(got, "answer-2") == STORY
        listed = await client.list_tasks(ListTasksRequest(context_id=got.context_id))
        assert [t.id for t in listed.tasks] == [task_id]
        assert listed.next_page_token == ""
        assert not listed.tasks[0].artifacts  # includeArtifacts false: omitted
    return events


async def test_stream_to_the_end_same_events_on_both_bindings(env: SimpleNamespace) -> None:
    per_binding = {b: await run_stream(env.base, b) for b in BINDINGS}
    for binding, events in per_binding.items():
        assert kind(events[0]) == "task", binding
        assert events[0].task.status.state == TaskState.TASK_STATE_SUBMITTED
        assert kind(events[-1]) == "status_update"
        assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
        seqs = [seq_of(getattr(e, kind(e))) for e in events[1:]]
        assert seqs == sorted(seqs), (binding, seqs)
        chunks = [e.artifact_update for e in events if kind(e) == "artifact_update"]
        story = [c for c in chunks if c.artifact.artifact_id == "answer-2"]
        assert len(story) > 3, "STORY streamed in chunks"
        assert not story[0].append and all(c.append for c in story[1:])
        assert story[-1].last_chunk and not any(c.last_chunk for c in story[:-1])
    norm = {b: normalise(e) for b, e in per_binding.items()}
    assert norm["JSONRPC"] == norm["GRPC"], norm
    assert ("artifact", "answer-2", STORY, False, True) in norm["GRPC"]
    assert norm["GRPC"][0] == ("task", "TASK_STATE_SUBMITTED")
    assert norm["GRPC"][-1] == ("status", "TASK_STATE_COMPLETED")


@pytest.mark.parametrize("binding", BINDINGS)
async def test_blocking_send_returns_the_finished_task(env: SimpleNamespace, binding: str) -> None:
    async with client_for(env.base, binding, streaming=False) as client:
        (resp,) = await collect(client.send_message(user_msg("Tell me a story")))
    assert kind(resp) == "task"
    assert resp.task.status.state == TaskState.TASK_STATE_COMPLETED
    assert artifact_text(resp.task, "answer-2") == STORY
    assert resp.task.context_id
    assert resp.task.history[0].parts[0].text == "Tell me a story"


# ------------------------------------------------------------------ cancel


@pytest.mark.parametrize("binding", BINDINGS)
async def test_cancel_mid_stream_no_content_after_it(env: SimpleNamespace, binding: str) -> None:
    marker = uuid.uuid4().hex[:8]
    events: list[StreamResponse] = []
    cancelled: list[Task] = []
    async with client_for(env.base, binding) as client:
        story_started = anyio.Event()

        async def cancel_when_streaming() -> None:
            await story_started.wait()
            cancelled.append(await client.cancel_task(CancelTaskRequest(id=events[0].task.id)))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_streaming)
                async for ev in client.send_message(user_msg(f"Tell me a story [{marker}]")):
                    events.append(ev)
                    if (
                        kind(ev) == "artifact_update"
                        and ev.artifact_update.artifact.artifact_id == "answer-2"
                    ):
                        story_started.set()
        task_id = events[0].task.id
        (done,) = cancelled
        assert done.status.state == TaskState.TASK_STATE_CANCELED, done
        # The stream ended with CANCELED; every content chunk came before it.
        last = events[-1]
        assert kind(last) == "status_update", normalise(events)
        assert last.status_update.status.state == TaskState.TASK_STATE_CANCELED
        arts = [e.artifact_update for e in events if kind(e) == "artifact_update"]
        assert all(seq_of(a) < seq_of(last.status_update) for a in arts)
        streamed = "".join(
            p.text for a in arts if a.artifact.artifact_id == "answer-2" for p in a.artifact.parts
        )
        assert STORY.startswith(streamed) and streamed != STORY, streamed
        # Nothing was recorded after the stop: the task holds what was streamed.
        got = await client.get_task(GetTaskRequest(id=task_id))
        assert artifact_text(got, "answer-2") == streamed
        # Idempotent: a second cancel returns the cancelled task.
        again = await client.cancel_task(CancelTaskRequest(id=task_id))
        assert again.status.state == TaskState.TASK_STATE_CANCELED
    # Stopped mid-generation: the model's stream of the story was closed.
    recs = env.llm.wait_streams(
        marker,
        lambda rs: any(r.get("outcome") == "client_closed" for r in rs),
        10,
        "the story's model stream closed by the commander",
    )
    assert [r.get("outcome") for r in recs] == ["completed", "client_closed"], recs


# ------------------------------------------------------------------ subscribe


@pytest.mark.parametrize("binding", BINDINGS)
async def test_subscribe_to_running_task_snapshot_first(env: SimpleNamespace, binding: str) -> None:
    async with client_for(env.base, binding) as client:
        req = user_msg("Tell me a story")
        req.configuration.return_immediately = True
        first = await anext(aiter(client.send_message(req)))
        task_id = first.task.id
        # Wait until the story streams, so the snapshot holds a part of it.
        for _ in range(1000):
            got = await client.get_task(GetTaskRequest(id=task_id))
            if "answer-2" in [a.artifact_id for a in got.artifacts]:
                break
            await anyio.sleep(0.02)
        else:
            raise AssertionError("the story did not start streaming within 20 s")
        with anyio.fail_after(30):
            events = await collect(client.subscribe(SubscribeToTaskRequest(id=task_id)))
    snap = events[0]
    assert kind(snap) == "task", normalise(events)
    assert snap.task.id == task_id
    assert snap.task.status.state == TaskState.TASK_STATE_WORKING
    before = artifact_text(snap.task, "answer-2")
    after = "".join(
        p.text
        for e in events[1:]
        if kind(e) == "artifact_update" and e.artifact_update.artifact.artifact_id == "answer-2"
        for p in e.artifact_update.artifact.parts
    )
    assert before + after == STORY, (before, after)
    assert all(seq_of(getattr(e, kind(e))) > seq_of(snap.task) for e in events[1:])
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED


async def test_two_subscribers_same_events_and_one_leaving_does_not_matter(
    env: SimpleNamespace,
) -> None:
    async with client_for(env.base, "GRPC") as g, client_for(env.base, "JSONRPC") as j:
        req = user_msg("Tell me a story")
        req.configuration.return_immediately = True
        task_id = (await anext(aiter(g.send_message(req)))).task.id
        seen: dict[str, list[StreamResponse]] = {"grpc": [], "jsonrpc": [], "leaver": []}

        async def follow(client: Client, name: str, leave_after: int = 0) -> None:
            async for ev in client.subscribe(SubscribeToTaskRequest(id=task_id)):
                seen[name].append(ev)
                if leave_after and len(seen[name]) >= leave_after:
                    return  # closes this stream

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow, g, "grpc")
                tg.start_soon(follow, j, "jsonrpc")
                tg.start_soon(follow, j, "leaver", 3)
    # Each got the task to its end; after the later snapshot, the same events.
    a, b = seen["grpc"], seen["jsonrpc"]
    for evs in (a, b):
        assert evs[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    start = max(seq_of(a[0].task), seq_of(b[0].task))
    tail = [[e for e in evs[1:] if seq_of(getattr(e, kind(e))) > start] for evs in (a, b)]
    assert normalise(tail[0]) == normalise(tail[1])
    assert len(seen["leaver"]) == 3


@pytest.mark.parametrize("binding", BINDINGS)
async def test_resume_extension_replays_after_a_seq(env: SimpleNamespace, binding: str) -> None:
    async with client_for(env.base, binding) as client:
        events = await collect(client.send_message(user_msg("Tell me a story")))
        task_id = events[0].task.id
        cut = seq_of(
            events[5].artifact_update
            if kind(events[5]) == "artifact_update"
            else events[5].status_update
        )
        ctx = ClientCallContext(
            service_parameters={"A2A-Extensions": RESUME_EXT, "Dispatcher-Resume-After": str(cut)}
        )
        resumed = await collect(client.subscribe(SubscribeToTaskRequest(id=task_id), context=ctx))
    assert kind(resumed[0]) == "task"
    assert resumed[0].task.status.state == TaskState.TASK_STATE_COMPLETED
    tail = [e for e in events[1:] if seq_of(getattr(e, kind(e))) > cut]
    assert normalise(resumed[1:]) == normalise(tail)
    assert len(tail) > 0


# ------------------------------------------------------------------ context


@pytest.mark.parametrize("binding", BINDINGS)
async def test_context_id_continues_the_conversation(env: SimpleNamespace, binding: str) -> None:
    marker = uuid.uuid4().hex[:8]
    async with client_for(env.base, binding, streaming=False) as client:
        (one,) = await collect(client.send_message(user_msg(f"First [{marker}]")))
        ctx = one.task.context_id
        (two,) = await collect(
            client.send_message(user_msg(f"And then? [{marker}]", context_id=ctx))
        )
        listed = await client.list_tasks(ListTasksRequest(context_id=ctx))
    assert two.task.context_id == ctx
    assert two.task.status.state == TaskState.TASK_STATE_COMPLETED
    assert [t.id for t in listed.tasks] == [two.task.id, one.task.id]
    # The model saw the first task's turns: two assistant messages in its
    # conversation put the script past its end (generated text, no intro).
    recs = env.llm.streams(f"And then? [{marker}]")
    assert recs, env.llm.stats()
    assert artifact_text(two.task, "answer-1") != INTRO


# ------------------------------------------------------------------ input required


@pytest.mark.parametrize("binding", BINDINGS)
async def test_input_required_round_trip(env: SimpleNamespace, binding: str) -> None:
    async with client_for(env.base, binding, streaming=False) as client:
        (held,) = await collect(
            client.send_message(user_msg("Click it", labels={"tenant": "hold"}))
        )
        t = held.task
        assert t.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, MessageToDict(t)
        question = t.status.message.parts[0].text
        assert "computer.click" in question and "approve" in question
        (done,) = await collect(
            client.send_message(user_msg("approve", task_id=t.id, context_id=t.context_id))
        )
    assert done.task.id == t.id
    assert done.task.status.state == TaskState.TASK_STATE_COMPLETED, MessageToDict(done.task)
    assert artifact_text(done.task, "answer-2") == STORY


async def input_required_stream(base: str, binding: str) -> list[list[StreamResponse]]:
    """The INPUT_REQUIRED round trip over streams: the first ends at the
    question, the answer's stream runs to the end."""
    async with client_for(base, binding) as client:
        first = await collect(client.send_message(user_msg("Click it", labels={"tenant": "hold"})))
        t = first[0].task
        second = await collect(
            client.send_message(user_msg("approve", task_id=t.id, context_id=t.context_id))
        )
    return [first, second]


async def test_input_required_streams_same_events_on_both_bindings(env: SimpleNamespace) -> None:
    per_binding = {b: await input_required_stream(env.base, b) for b in BINDINGS}
    for binding, (first, second) in per_binding.items():
        last = first[-1].status_update.status
        assert last.state == TaskState.TASK_STATE_INPUT_REQUIRED, (binding, normalise(first))
        assert "computer.click" in last.message.parts[0].text
        assert kind(second[0]) == "task" and second[0].task.id == first[0].task.id
        assert second[0].task.status.state == TaskState.TASK_STATE_WORKING  # the answer's state
        assert second[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
        assert ("artifact", "answer-2", STORY, False, True) in normalise(second)
    j, g = per_binding["JSONRPC"], per_binding["GRPC"]
    assert [normalise(x) for x in j] == [normalise(x) for x in g]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("binding", BINDINGS)
async def test_error_codes(env: SimpleNamespace, binding: str) -> None:
    async with client_for(env.base, binding, streaming=False) as client:
        with pytest.raises(TaskNotFoundError):
            await client.get_task(GetTaskRequest(id="no-such-task"))
        with pytest.raises(TaskNotFoundError):
            await client.cancel_task(CancelTaskRequest(id="no-such-task"))
        with pytest.raises(TaskNotFoundError):
            await collect(client.send_message(user_msg("hi", task_id="no-such-task")))
        (done,) = await collect(client.send_message(user_msg("Tell me a story")))
        with pytest.raises(InvalidParamsError):  # contextId is not the task's
            await collect(
                client.send_message(user_msg("more", task_id=done.task.id, context_id="other"))
            )
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(CancelTaskRequest(id=done.task.id))
        with pytest.raises(UnsupportedOperationError):
            await collect(client.send_message(user_msg("more", task_id=done.task.id)))
        bad = SendMessageRequest(
            message=Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER)
        )  # no parts
        with pytest.raises(InvalidParamsError):
            await collect(client.send_message(bad))
        with pytest.raises(PushNotificationNotSupportedError):
            await client.create_task_push_notification_config(
                TaskPushNotificationConfig(task_id=done.task.id, url="http://127.0.0.1:9/hook")
            )
    async with client_for(env.base, binding) as streaming:
        with pytest.raises(UnsupportedOperationError):
            await collect(streaming.subscribe(SubscribeToTaskRequest(id=done.task.id)))
        with pytest.raises(TaskNotFoundError):
            await collect(streaming.subscribe(SubscribeToTaskRequest(id="no-such-task")))


async def jsonrpc(base: str, body: Any, version: str = "1.0") -> dict[str, Any]:
    headers = {"A2A-Version": version} if version else {}
    async with httpx.AsyncClient(timeout=10) as hc:
        raw = body if isinstance(body, str) else json.dumps(body)
        r = await hc.post(base + "/a2a", content=raw, headers=headers)
    out: dict[str, Any] = r.json()
    return out


async def test_jsonrpc_error_codes(env: SimpleNamespace) -> None:
    call = {"jsonrpc": "2.0", "id": 7, "method": "GetTask", "params": {"id": "no-such-task"}}
    codes = {
        "parse error": (await jsonrpc(env.base, "{not json"))["error"]["code"],
        "invalid request": (await jsonrpc(env.base, {**call, "jsonrpc": "1.0"}))["error"]["code"],
        "method not found": (await jsonrpc(env.base, {**call, "method": "tasks/get"}))["error"][
            "code"
        ],
        "invalid params": (await jsonrpc(env.base, {**call, "params": {"id": 5}}))["error"]["code"],
        "task not found": (await jsonrpc(env.base, call))["error"]["code"],
        "version not supported": (await jsonrpc(env.base, call, version="2.0"))["error"]["code"],
        # No A2A-Version is 0.3 (the spec): the 0.3 method names are served then.
        "0.3 without a version": (
            await jsonrpc(env.base, {**call, "method": "tasks/get"}, version="")
        )["error"]["code"],
        "extended card not declared": (
            await jsonrpc(env.base, {**call, "method": "GetExtendedAgentCard", "params": {}})
        )["error"]["code"],
        "push not supported": (
            await jsonrpc(
                env.base,
                {**call, "method": "ListTaskPushNotificationConfigs", "params": {"taskId": "x"}},
            )
        )["error"]["code"],
    }
    assert codes == {
        "parse error": -32700,
        "invalid request": -32600,
        "method not found": -32601,
        "invalid params": -32602,
        "task not found": -32001,
        "version not supported": -32009,
        "0.3 without a version": -32001,
        "extended card not declared": -32004,
        "push not supported": -32003,
    }
    ok = await jsonrpc(env.base, {**call, "method": "ListTasks", "params": {}})
    assert "nextPageToken" in ok["result"], ok  # always present, "" on the last page


async def test_grpc_status_codes(env: SimpleNamespace) -> None:
    async with grpc.aio.insecure_channel(env.d.addr) as ch:
        stub = a2a_pb2_grpc.A2AServiceStub(ch)  # type: ignore[no-untyped-call]
        cases = {
            "task not found": (GetTaskRequest(id="no-such-task"), "1.0"),
            "version not supported": (GetTaskRequest(id="no-such-task"), "0.3"),
        }
        got = {}
        for name, (req, version) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetTask(req, metadata=(("a2a-version", version),))
            got[name] = err.value.code()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateTaskPushNotificationConfig(
                TaskPushNotificationConfig(task_id="x", url="http://127.0.0.1:9/hook")
            )
        got["push not supported"] = err.value.code()
    assert got == {
        "task not found": grpc.StatusCode.NOT_FOUND,
        "version not supported": grpc.StatusCode.FAILED_PRECONDITION,
        "push not supported": grpc.StatusCode.FAILED_PRECONDITION,
    }


# ------------------------------------------------------------------ auth


@pytest.fixture(scope="module")
def guarded(module_stack: Stack) -> SimpleNamespace:
    d = module_stack.dispatcher("--http-listen", "127.0.0.1:0", client_token=TOKEN)
    return SimpleNamespace(d=d, base=f"http://{http_addr(d.proc)}")


TOKEN = "a2a-client-token"


@pytest.mark.parametrize("binding", BINDINGS)
async def test_bearer_token_as_on_the_http_api(guarded: SimpleNamespace, binding: str) -> None:
    async with httpx.AsyncClient() as hc:
        card = await A2ACardResolver(hc, guarded.base).get_agent_card()  # the card is public
    (scheme,) = card.security_schemes.values()
    assert scheme.http_auth_security_scheme.scheme == "Bearer"
    assert list(card.security_requirements[0].schemes) == list(card.security_schemes)
    async with client_for(guarded.base, binding) as client:
        with pytest.raises(A2AError if binding == "GRPC" else A2AClientError):
            await client.get_task(GetTaskRequest(id="no-such-task"))
        with_token = ClientCallContext(service_parameters={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(TaskNotFoundError):  # authenticated: the call ran
            await client.get_task(GetTaskRequest(id="no-such-task"), context=with_token)
