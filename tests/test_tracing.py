"""OpenTelemetry across the processes: one task is one trace.

The dispatcher, the commander and the tool provider export OTLP/gRPC to a collector
in this test process. A client span's traceparent goes with SubmitTask; the test
then checks the parent of every span the task made: the dispatcher's task and
session spans, the commander's session span (context carried by the start
packet), its model and tool_call spans, the dispatcher's execute_tool spans
(context carried back by the tool_call packet) and the provider's execute_tool
span (context carried by the invocation).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from commander._gen.dispatch.v1 import tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests import _procs
from tests._client import wait_status
from tests._procs import wait_until
from tests.conftest import Stack
from tests.scripted import tool_call

pytestmark = pytest.mark.e2e

SCRIPT = [
    {
        "tool_calls": [
            tool_call("calculator", {"expression": "6 * 7"}),
            tool_call("workspace.write_file", {"path": "trace.txt", "content": "traced"}),
        ]
    },
    {"content": "42, and the file is written."},
]


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    events: tuple[str, ...]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"
        self._server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            service=service,
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            events=tuple(e.name for e in s.events),
                        )
                    )
        with self._lock:
            self._spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def stop(self) -> None:
        self._server.stop(grace=None)


@pytest.fixture()
def collector() -> Iterator[Collector]:
    c = Collector()
    try:
        yield c
    finally:
        c.stop()


def otel_env(endpoint: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms; Go and Python read the same variable
    }


def one(spans: list[Span], service: str, name: str) -> Span:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, f"{service} {name!r}: {len(found)} spans in\n" + "\n".join(
        f"  {s.service} {s.name} {s.span_id} <- {s.parent}" for s in spans
    )
    return found[0]


def test_one_task_is_one_trace_across_processes(
    module_stack: Stack, collector: Collector, tmp_path: Path
) -> None:
    env = otel_env(collector.endpoint)
    llm = module_stack.scripted(SCRIPT)
    d = module_stack.dispatcher(env=env)
    module_stack.provider(d, tmp_path / "ws", env=env)
    module_stack.commander(d, llm.base_url, slots=1, wait_slots=1, env=env)

    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(
            instruction=f"compute and write [{uuid.uuid4().hex[:8]}]",
            running_config=llm.model_config(),
        ),
        metadata=[("traceparent", f"00-{trace_id}-{client_span}-01")],
        timeout=5,
    ).task_id
    assert wait_status(d.agent, task_id).status == agent_pb2.SUCCESS

    want = {
        ("dispatcher", "task"),
        ("dispatcher", "session"),
        ("dispatcher", "execute_tool workspace.write_file"),
        ("commander", "session"),
        ("commander", "tool_call workspace.write_file"),
        ("commander-tools", "execute_tool workspace.write_file"),
    }
    spans = wait_until(
        lambda: (s := collector.spans(trace_id)) and want <= {(x.service, x.name) for x in s} and s,
        20,
        "the spans of the task reached the collector",
        interval=0.1,
    )
    assert {s.trace_id for s in spans} == {trace_id}

    submit = one(spans, "dispatcher", "dispatch.v1.TaskService/SubmitTask")
    task = one(spans, "dispatcher", "task")
    d_session = one(spans, "dispatcher", "session")
    c_session = one(spans, "commander", "session")
    assert submit.parent == client_span
    assert task.parent == submit.span_id
    assert d_session.parent == task.span_id
    # Dispatcher → commander, in the start packet.
    assert c_session.parent == d_session.span_id
    # The model calls: one per turn.
    chats = [s for s in spans if s.service == "commander" and s.name == "chat scripted"]
    assert len(chats) == 2 and all(s.parent == c_session.span_id for s in chats), chats
    assert all("first token" in s.events for s in chats), chats
    for tool in ("calculator", "workspace.write_file"):
        call = one(spans, "commander", f"tool_call {tool}")
        execute = one(spans, "dispatcher", f"execute_tool {tool}")
        assert call.parent == c_session.span_id
        # Commander → dispatcher, in the tool_call packet.
        assert execute.parent == call.span_id, tool
    # Dispatcher → provider, in the invocation.
    provider = one(spans, "commander-tools", "execute_tool workspace.write_file")
    assert provider.parent == one(spans, "dispatcher", "execute_tool workspace.write_file").span_id


def test_a_stop_is_on_both_session_spans(module_stack: Stack, collector: Collector) -> None:
    env = otel_env(collector.endpoint)
    llm = module_stack.scripted(tokens_per_sec=20, tokens=10_000)
    d = module_stack.dispatcher(env=env)
    module_stack.commander(d, llm.base_url, slots=1, wait_slots=1, env=env)

    trace_id = secrets.token_hex(16)
    marker = uuid.uuid4().hex[:8]
    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(
            instruction=f"talk [{marker}]", running_config=llm.model_config()
        ),
        metadata=[("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")],
        timeout=5,
    ).task_id
    llm.wait_streams(marker, lambda recs: len(recs) == 1, 20, "the model stream opened")
    d.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task_id), timeout=5)
    assert wait_status(d.agent, task_id).status == agent_pb2.CANCELLED

    def sessions() -> list[Span] | None:
        s = [x for x in collector.spans(trace_id) if x.name == "session"]
        return s if len(s) == 2 else None

    d_session, c_session = sorted(
        wait_until(sessions, 20, "both session spans exported", interval=0.1),
        key=lambda s: s.service != "dispatcher",
    )
    assert c_session.parent == d_session.span_id
    assert "stop decided" in d_session.events and "stopped" in d_session.events, d_session
    assert "stop requested" in c_session.events, c_session
    # The cut-short model call is in the trace too.
    chat = [s for s in collector.spans(trace_id) if s.name == "chat scripted"]
    assert len(chat) == 1 and chat[0].parent == c_session.span_id, chat


def test_dispatchctl_starts_the_trace(module_stack: Stack, collector: Collector) -> None:
    """`dispatchctl run` with the OTEL variables is the root of its task's trace."""
    env = otel_env(collector.endpoint)
    llm = module_stack.scripted([{"content": "traced from the CLI"}])
    d = module_stack.dispatcher(env=env)
    module_stack.commander(d, llm.base_url, slots=1, wait_slots=1, env=env)
    res = subprocess.run(
        [str(_procs.ensure_binary("dispatchctl")), "--addr", d.addr, "run", "say it"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env, "NO_COLOR": "1"},
    )
    assert res.returncode == 0, res.stderr
    trace_id = re.search(r"trace_id ([0-9a-f]{32})", res.stderr)
    assert trace_id, res.stderr
    want = {("dispatchctl", "dispatchctl run"), ("dispatcher", "task"), ("commander", "session")}
    spans = wait_until(
        lambda: (
            (s := collector.spans(trace_id.group(1)))
            and want <= {(x.service, x.name) for x in s}
            and s
        ),
        20,
        "the CLI's trace reached the collector",
        interval=0.1,
    )
    root = one(spans, "dispatchctl", "dispatchctl run")
    assert root.parent == ""
    submit = [s for s in spans if s.service == "dispatcher" and s.name.endswith("/SubmitTask")]
    assert len(submit) == 1 and one(spans, "dispatcher", "task").parent == submit[0].span_id
    # The CLI's own client span sits between its root and the dispatcher's server span.
    client = [s for s in spans if s.service == "dispatchctl" and s.span_id == submit[0].parent]
    assert client and client[0].parent == root.span_id, spans
