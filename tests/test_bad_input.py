"""Bad input over the wire: each gets the right gRPC status or error packet, and
the dispatcher goes on serving a normal task end to end afterwards."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import grpc
import pytest

from commander._gen.dispatch.v1 import (
    interaction_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)
from commander._gen.lybic.agent import agent_pb2, agent_pb2_grpc
from tests import _procs
from tests._client import RawProvider, RawSlot, StreamEnded, describe, kind, wait_status, watch_all
from tests.conftest import Dispatcher, Stack

pytestmark = pytest.mark.e2e

ANSWER = "All good."
ipb = interaction_pb2


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    llm = module_stack.scripted([{"content": ANSWER}])
    d = module_stack.dispatcher()
    cmd = module_stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    return SimpleNamespace(llm=llm, d=d, cmd=cmd)


def assert_serves(d: Dispatcher) -> None:
    """A normal task runs end to end through the real commander."""
    stream = list(
        d.agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction=f"still ok? {uuid.uuid4().hex[:6]}"),
            timeout=30,
        )
    )
    assert stream and stream[-1].stage == "final", [(s.stage, s.message) for s in stream]
    assert stream[-1].message == ANSWER


def rpc_code(fn, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """Calls fn (draining it if it streams) and returns the error code it fails with."""
    with pytest.raises(grpc.RpcError) as info:
        out = fn(*args, **kwargs)
        if hasattr(out, "__next__"):  # a server stream: the error comes while reading
            for _ in out:
                pass
    return info.value.code()


# ------------------------------------------------------------------ client API


def test_empty_instruction(env: SimpleNamespace) -> None:
    d = env.d
    req = agent_pb2.RunAgentInstructionRequest(instruction="")
    assert rpc_code(d.agent.RunAgentInstruction, req, timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        rpc_code(d.agent.RunAgentInstructionAsync, req, timeout=5)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        rpc_code(d.tasks.SubmitTask, tasks_pb2.SubmitTaskRequest(instruction=""), timeout=5)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert_serves(d)


def test_unknown_task_id(env: SimpleNamespace) -> None:
    d = env.d
    missing = "no-such-task-" + uuid.uuid4().hex
    status = d.agent.QueryTaskStatus(agent_pb2.QueryTaskStatusRequest(taskId=missing), timeout=5)
    assert status.status == agent_pb2.NOT_FOUND, status
    assert (
        rpc_code(
            d.agent.GetAgentTaskStream,
            agent_pb2.GetAgentTaskStreamRequest(taskId=missing),
            timeout=5,
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        rpc_code(d.tasks.WatchTask, tasks_pb2.WatchTaskRequest(task_id=missing), timeout=5)
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        rpc_code(d.tasks.GetTask, tasks_pb2.GetTaskRequest(task_id=missing), timeout=5)
        == grpc.StatusCode.NOT_FOUND
    )
    cancel = d.agent.CancelTask(agent_pb2.CancelTaskRequest(taskId=missing), timeout=5)
    assert cancel.success is False, cancel
    assert_serves(d)


def test_message_over_size_limit(env: SimpleNamespace) -> None:
    d = env.d
    huge = "x" * (5 * 1024 * 1024)
    assert (
        rpc_code(
            d.agent.RunAgentInstructionAsync,
            agent_pb2.RunAgentInstructionRequest(instruction=huge),
            timeout=10,
        )
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert_serves(d)


def test_max_msg_bytes_flag(stack: Stack) -> None:
    d = stack.dispatcher("--max-msg-bytes", "65536")
    with pytest.raises(grpc.RpcError) as info:
        d.agent.RunAgentInstructionAsync(
            agent_pb2.RunAgentInstructionRequest(instruction="z" * 70_000), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    ok = d.agent.RunAgentInstructionAsync(
        agent_pb2.RunAgentInstructionRequest(instruction="z" * 60_000), timeout=5
    )
    assert ok.taskId


# ------------------------------------------------------------------ raw ChatStream


def test_packet_before_hello(env: SimpleNamespace) -> None:
    slot = RawSlot(env.d.channel)
    try:
        slot.send(ipb.UpstreamPacket(session_id="s", content=ipb.ContentChunk(text="hi")))
        assert slot.wait_end(10) == grpc.StatusCode.FAILED_PRECONDITION, slot.details
    finally:
        slot.close()
    assert_serves(env.d)


def test_second_hello(env: SimpleNamespace) -> None:
    slot = RawSlot(env.d.channel)
    try:
        slot.hello(["planner:raw"])
        slot.send(ipb.UpstreamPacket(hello=ipb.Hello(commander_id="again", capabilities=["x"])))
        assert slot.wait_end(10) == grpc.StatusCode.FAILED_PRECONDITION, slot.details
    finally:
        slot.close()
    assert_serves(env.d)


def _expect_rejected(slot: RawSlot) -> ipb.Ack:
    pkt = slot.recv(10)
    assert pkt.WhichOneof("signal") == "ack", pkt
    assert pkt.ack.kind == ipb.ACK_KIND_REJECTED, pkt
    assert pkt.ack.detail, pkt
    return pkt.ack


def test_no_payload_and_unknown_session_are_rejected_stream_goes_on(env: SimpleNamespace) -> None:
    d = env.d
    slot = RawSlot(d.channel)
    try:
        slot.hello(["planner:raw-reject"])
        slot.send(ipb.UpstreamPacket())  # no payload, no session
        _expect_rejected(slot)
        slot.send(ipb.UpstreamPacket(session_id="no-such-session"))  # no payload
        _expect_rejected(slot)
        slot.send(
            ipb.UpstreamPacket(session_id="no-such-session", content=ipb.ContentChunk(text="stray"))
        )
        _expect_rejected(slot)
        slot.send(
            ipb.UpstreamPacket(
                session_id="no-such-session",
                tool_call=ipb.ToolCallRequest(tool_name="echo", arguments_json="{}", call_id="c1"),
            )
        )
        _expect_rejected(slot)
        slot.send(
            ipb.UpstreamPacket(
                session_id="no-such-session",
                result=ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="x"),
            )
        )
        _expect_rejected(slot)
        # The stream went on: the slot still takes a task and runs it.
        task_id, start = slot.take_task(d.tasks, "raw task", "raw-reject")
        assert start.start.task_id == task_id and start.session_id
        sid = start.session_id
        # Content for another session while this one runs is rejected too, and
        # does not reach the task.
        slot.send(
            ipb.UpstreamPacket(session_id=sid + "-other", content=ipb.ContentChunk(text="bad"))
        )
        _expect_rejected(slot)
        slot.send(ipb.UpstreamPacket(session_id=sid, content=ipb.ContentChunk(text="good")))
        slot.send(
            ipb.UpstreamPacket(
                session_id=sid,
                result=ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="R"),
            )
        )
        closed = slot.recv_until(lambda p: p.WhichOneof("signal") == "ack", 10)
        assert closed.ack.kind == ipb.ACK_KIND_SESSION_CLOSED, closed
        events = watch_all(d.tasks, task_id, timeout=10)
        texts = [e.content.text for e in events if kind(e) == "content"]
        assert texts == ["good"], describe(events)
        status = wait_status(d.agent, task_id)
        assert status.status == agent_pb2.SUCCESS and status.result == "R", status
        # Late content for the closed session: rejected.
        slot.send(ipb.UpstreamPacket(session_id=sid, content=ipb.ContentChunk(text="late")))
        _expect_rejected(slot)
        assert [e.seq for e in watch_all(d.tasks, task_id, timeout=10)] == [e.seq for e in events]
    finally:
        slot.close()
    assert_serves(d)


def test_oversized_upstream_packet_ends_only_that_stream(env: SimpleNamespace) -> None:
    """Over the limit but under the transport's ceiling (twice it): refused
    alone, the stream goes on; over the ceiling: that stream ends."""
    d = env.d
    slot = RawSlot(d.channel)
    try:
        slot.hello(["planner:raw-big"])
        slot.send(
            ipb.UpstreamPacket(
                session_id="whatever", content=ipb.ContentChunk(text="y" * (5 * 1024 * 1024))
            )
        )
        assert "exceeds the limit of" in _expect_rejected(slot).detail
        slot.send(
            ipb.UpstreamPacket(
                session_id="whatever", content=ipb.ContentChunk(text="y" * (9 * 1024 * 1024))
            )
        )
        assert slot.wait_end(10) == grpc.StatusCode.RESOURCE_EXHAUSTED, slot.details
    finally:
        slot.close()
    # The real commander's slot was not affected.
    d.wait_slots(1, timeout=10)
    assert_serves(d)


def test_tool_call_errors_on_a_raw_session(env: SimpleNamespace) -> None:
    """Unknown tool, arguments that are not JSON / not an object / fail the schema,
    a duplicate call_id: each an error tool_result by call_id; the session goes on."""
    d = env.d
    slot = RawSlot(d.channel)
    try:
        slot.hello(["planner:raw-tools"])
        task_id, start = slot.take_task(d.tasks, "tools", "raw-tools")
        sid = start.session_id
        assert start.start.task_id == task_id
        assert {"calculator", "echo"} <= {t.name for t in start.start.tools}, start.start.tools

        def call(call_id: str, tool: str, args: str) -> ipb.ToolCallResult:
            slot.send(
                ipb.UpstreamPacket(
                    session_id=sid,
                    tool_call=ipb.ToolCallRequest(
                        tool_name=tool, arguments_json=args, call_id=call_id
                    ),
                )
            )
            pkt = slot.recv_until(
                lambda p: (
                    p.WhichOneof("signal") == "tool_result" and p.tool_result.call_id == call_id
                ),
                10,
            )
            assert pkt.session_id == sid
            return pkt.tool_result

        cases = [
            ("c-unknown", "no_such_tool", "{}", ipb.TOOL_ERROR_CODE_UNKNOWN_TOOL),
            ("c-notjson", "calculator", '{"expression": ', ipb.TOOL_ERROR_CODE_INVALID_ARGUMENTS),
            ("c-notobj", "calculator", '"1 + 1"', ipb.TOOL_ERROR_CODE_INVALID_ARGUMENTS),
            ("c-schema", "calculator", '{"expression": 12}', ipb.TOOL_ERROR_CODE_INVALID_ARGUMENTS),
            (
                "c-extra",
                "calculator",
                '{"expression": "1", "x": 1}',
                ipb.TOOL_ERROR_CODE_INVALID_ARGUMENTS,
            ),
        ]
        for call_id, tool, args, code in cases:
            res = call(call_id, tool, args)
            assert res.HasField("error"), (call_id, res)
            assert res.error.code == code, (call_id, ipb.ToolErrorCode.Name(res.error.code), res)
            assert not res.result_json

        ok = call("c-ok", "calculator", '{"expression": "(1 + 2) * 3"}')
        assert not ok.HasField("error"), ok
        assert "9" in ok.result_json, ok
        dup = call("c-ok", "echo", '{"a": 1}')
        assert dup.HasField("error"), f"duplicate call_id executed: {dup}"
        echo = call("c-echo", "echo", '{"a": [1, 2]}')
        assert not echo.HasField("error"), echo

        slot.send(ipb.UpstreamPacket(session_id=sid, content=ipb.ContentChunk(text="went on")))
        slot.send(
            ipb.UpstreamPacket(
                session_id=sid,
                result=ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="went on"),
            )
        )
        status = wait_status(d.agent, task_id)
        assert status.status == agent_pb2.SUCCESS and status.result == "went on", status
        events = watch_all(d.tasks, task_id, timeout=10)
        results = {e.tool_result.result.call_id for e in events if kind(e) == "tool_result"}
        assert {c for c, *_ in cases} | {"c-ok", "c-echo"} <= results, describe(events)
    finally:
        slot.close()
    assert_serves(d)


# ------------------------------------------------------------------ auth


def test_tokens(stack: Stack) -> None:
    llm = stack.scripted([{"content": ANSWER}])
    d = stack.dispatcher(client_token="client-secret", commander_token="commander-secret")
    ch = grpc.insecure_channel(d.addr)
    try:
        agent = agent_pb2_grpc.AgentStub(ch)
        tasks = tasks_pb2_grpc.TaskServiceStub(ch)
        client_calls = [
            (agent.GetAgentInfo, agent_pb2.GetAgentInfoRequest()),
            (tasks.SubmitTask, tasks_pb2.SubmitTaskRequest(instruction="x")),
            (agent.RunAgentInstruction, agent_pb2.RunAgentInstructionRequest(instruction="x")),
        ]
        for md in (
            None,
            [("authorization", "Bearer wrong")],
            [("authorization", "client-secret")],  # no Bearer scheme
            [("authorization", "Bearer commander-secret")],  # the other role's token
        ):
            for method, request in client_calls:
                assert rpc_code(method, request, metadata=md, timeout=5) == (
                    grpc.StatusCode.UNAUTHENTICATED
                ), (md, request)
        # Health needs no token.
        assert _procs.health_status(d.addr) == _procs.HEALTH_SERVING

        # Commander side: no token, or the client's token, is refused.
        for md in (None, [("authorization", "Bearer client-secret")]):
            slot = RawSlot(ch, metadata=md)
            try:
                slot.send(
                    ipb.UpstreamPacket(
                        hello=ipb.Hello(commander_id="intruder", capabilities=["planner:chat"])
                    )
                )
                with pytest.raises(StreamEnded) as ended:
                    slot.recv(10)
                assert ended.value.code == grpc.StatusCode.UNAUTHENTICATED, ended.value
            finally:
                slot.close()
            provider = tools_pb2_grpc.ToolProviderServiceStub(ch)
            hello = tools_pb2.ConnectRequest(hello=tools_pb2.ProviderHello(provider_id="intruder"))
            assert rpc_code(provider.Connect, iter([hello]), metadata=md, timeout=5) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), md

        # With the right tokens, everything works end to end.
        assert d.slots() == 0
        stack.commander(d, llm.base_url, slots=1, token="commander-secret", wait_slots=1)
        assert_serves(d)
    finally:
        ch.close()


# ------------------------------------------------------------------ tool provider stream


def test_provider_protocol(env: SimpleNamespace) -> None:
    """A provider's results are routed by invocation; a result for an unknown or
    finished invocation is rejected and the stream goes on; a tool name already
    served is refused with ALREADY_EXISTS; schema checks happen before routing."""
    d = env.d
    spec = ipb.ToolSpec(
        name="raw.double",
        description="doubles n",
        parameters_json_schema=(
            '{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}'
        ),
    )
    provider = RawProvider(d.channel)
    slot = RawSlot(d.channel)
    try:
        assert provider.hello("raw-provider", [spec]) == ["raw.double"]

        provider.send(
            tools_pb2.ConnectRequest(
                result=tools_pb2.InvocationResult(invocation_id="no-such-invocation")
            )
        )
        rejected = provider.recv(10)
        assert rejected.WhichOneof("msg") == "rejected", rejected
        assert rejected.rejected.invocation_id == "no-such-invocation"

        # The same tool name, or a built-in's, cannot be registered twice.
        for name in ("raw.double", "calculator"):
            dup = RawProvider(d.channel)
            try:
                dup.send(
                    tools_pb2.ConnectRequest(
                        hello=tools_pb2.ProviderHello(
                            provider_id="dup", tools=[ipb.ToolSpec(name=name)]
                        )
                    )
                )
                assert dup.wait_end(10) == grpc.StatusCode.ALREADY_EXISTS, (name, dup.details)
            finally:
                dup.close()

        slot.hello(["planner:raw-provider"])
        task_id, start = slot.take_task(d.tasks, "provider", "raw-provider")
        sid = start.session_id
        assert "raw.double" in {t.name for t in start.start.tools}

        def ask(call_id: str, args: str) -> None:
            slot.send(
                ipb.UpstreamPacket(
                    session_id=sid,
                    tool_call=ipb.ToolCallRequest(
                        tool_name="raw.double", arguments_json=args, call_id=call_id
                    ),
                )
            )

        def result_of(call_id: str) -> ipb.ToolCallResult:
            pkt = slot.recv_until(
                lambda p: (
                    p.WhichOneof("signal") == "tool_result" and p.tool_result.call_id == call_id
                ),
                10,
            )
            return pkt.tool_result

        # Fails the schema: answered by the dispatcher, never routed.
        ask("c-bad", '{"n": "five"}')
        bad = result_of("c-bad")
        assert bad.error.code == ipb.TOOL_ERROR_CODE_INVALID_ARGUMENTS, bad

        ask("c-1", '{"n": 21}')
        inv = provider.recv_until(lambda m: m.WhichOneof("msg") == "invoke", 10).invoke
        assert inv.call_id == "c-1", f"the schema-failing call was routed: {inv}"
        assert inv.tool_name == "raw.double"
        assert inv.task_id == task_id and inv.session_id == sid
        assert inv.HasField("deadline")
        provider.send(
            tools_pb2.ConnectRequest(
                result=tools_pb2.InvocationResult(
                    invocation_id=inv.invocation_id, result_json='{"doubled": 42}'
                )
            )
        )
        ok = result_of("c-1")
        assert not ok.HasField("error"), ok
        assert ok.result_json.replace(" ", "") == '{"doubled":42}', ok
        assert ok.tool_name == "raw.double"

        # A second result for the finished invocation is rejected; the stream goes on.
        provider.send(
            tools_pb2.ConnectRequest(
                result=tools_pb2.InvocationResult(
                    invocation_id=inv.invocation_id, result_json='{"doubled": 0}'
                )
            )
        )
        again = provider.recv(10)
        assert again.WhichOneof("msg") == "rejected", again

        # The provider's own error reaches the planner with its code.
        ask("c-2", '{"n": 1}')
        inv2 = provider.recv_until(lambda m: m.WhichOneof("msg") == "invoke", 10).invoke
        assert inv2.call_id == "c-2"
        provider.send(
            tools_pb2.ConnectRequest(
                result=tools_pb2.InvocationResult(
                    invocation_id=inv2.invocation_id,
                    error=ipb.ToolError(
                        code=ipb.TOOL_ERROR_CODE_EXECUTION_FAILED, message="disk on fire"
                    ),
                )
            )
        )
        failed = result_of("c-2")
        assert failed.error.code == ipb.TOOL_ERROR_CODE_EXECUTION_FAILED, failed
        assert "disk on fire" in failed.error.message

        slot.send(
            ipb.UpstreamPacket(
                session_id=sid,
                result=ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="done"),
            )
        )
        assert wait_status(d.agent, task_id).status == agent_pb2.SUCCESS
        events = watch_all(d.tasks, task_id, timeout=10)
        executors = {
            e.tool_result.result.call_id: e.tool_result.executor
            for e in events
            if kind(e) == "tool_result"
        }
        assert executors.get("c-1") == "raw-provider", executors
    finally:
        slot.close()
        provider.close()
    # Its tools go away with the stream.
    _procs.wait_until(lambda: "raw.double" not in d.tool_names(), 10, "raw.double unregistered")
    assert_serves(d)
