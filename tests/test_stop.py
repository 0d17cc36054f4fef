"""A stop sent mid-generation cuts the session short everywhere.

Real commander, scripted model streaming 500 tokens at 50 tokens/s; two
clients watch the task (native WatchTask and seed-000 GetAgentTaskStream) while
a third cancels it.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from types import SimpleNamespace

import grpc
import pytest

from commander._gen.dispatch.v1 import interaction_pb2, tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import (
    CONTENT_KINDS,
    CONTENT_STAGES,
    RawSlot,
    describe,
    kind,
    start_task_stream,
    start_watch,
    wait_status,
    watch_all,
)
from tests.conftest import Stack

pytestmark = pytest.mark.e2e

TOKENS = 500
RATE = 50


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    llm = module_stack.scripted(tokens_per_sec=RATE, tokens=TOKENS, reasoning_tokens=5)
    d = module_stack.dispatcher()
    module_stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    return SimpleNamespace(llm=llm, d=d)


def test_stop_mid_generation(env: SimpleNamespace) -> None:
    d, llm = env.d, env.llm
    instruction = f"Write a very long story [{uuid.uuid4().hex[:10]}]"
    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction=instruction), timeout=5
    ).task_id
    native = start_watch(d.tasks, task_id)
    seed = start_task_stream(d.agent, task_id)

    # Both clients are receiving content.
    native.wait(lambda evs: sum(kind(e) == "content" for e in evs) >= 10, 20, "native content")
    seed.wait(lambda ts: sum(t.stage == "content" for t in ts) >= 10, 20, "seed content")

    cancel_wall_us = time.time_ns() // 1000
    t_cancel = time.monotonic()
    resp = d.tasks.CancelTask(
        tasks_pb2.CancelTaskRequest(task_id=task_id, reason="test: stop now"), timeout=5
    )
    cancel_rtt = time.monotonic() - t_cancel
    assert resp.cancelled is True, resp

    native.join(15)
    seed.join(15)
    t_end = time.monotonic() - t_cancel
    assert native.error is None, native.error
    assert seed.error is None, seed.error
    events = native.values()

    # --- native stream: numbered, stop then stopped then CANCELLED, nothing after the stop
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), describe(events)
    assert all(e.task_id == task_id for e in events)
    kinds = [kind(e) for e in events]
    assert kinds.count("stop") == 1, describe(events)
    stop_i = kinds.index("stop")
    stop_ev = events[stop_i]
    assert stop_ev.stop.code == interaction_pb2.STOP_CODE_CLIENT_CANCEL, stop_ev
    after_stop = events[stop_i + 1 :]
    leaked = [e for e in after_stop if kind(e) in (*CONTENT_KINDS, "tool_call")]
    assert not leaked, f"content after the stop:\n{describe(leaked)}"
    assert "stopped" in [kind(e) for e in after_stop], describe(events)
    last = events[-1]
    assert kind(last) == "state" and last.state.status == agent_pb2.CANCELLED, describe(events)
    assert sum(k == "content" for k in kinds[:stop_i]) >= 10

    # --- seed stream: the same story, in stages
    stages = [t.stage for t in seed.values()]
    assert stages.count("stop") == 1, stages
    s_stop = stages.index("stop")
    assert not [s for s in stages[s_stop + 1 :] if s in CONTENT_STAGES], stages[s_stop:]
    assert stages[-1] == "cancelled", stages[-5:]
    assert stages.count("content") == kinds.count("content")

    # --- the model server saw its stream closed by the client, shortly after the stop
    recs = llm.wait_streams(
        instruction, lambda r: r and r[0]["outcome"] != "active", 5, "stream closed"
    )
    assert len(recs) == 1, recs
    rec = recs[0]
    assert rec["outcome"] == "client_closed", rec
    assert rec["tokens"] < TOKENS, rec
    close_after_cancel = (rec["end_us"] - cancel_wall_us) / 1e6
    stop_to_stopped = next(e for e in after_stop if kind(e) == "stopped").time.ToNanoseconds()
    stop_to_stopped = (stop_to_stopped - stop_ev.time.ToNanoseconds()) / 1e9
    print(
        f"\nstop: CancelTask rtt {cancel_rtt * 1000:.1f} ms; model stream closed "
        f"{close_after_cancel * 1000:.1f} ms after the cancel; stop→stopped "
        f"{stop_to_stopped * 1000:.1f} ms (dispatcher clock); both watchers ended "
        f"{t_end * 1000:.0f} ms after the cancel; {rec['tokens']}/{TOKENS} tokens generated"
    )
    assert close_after_cancel < 2.0, f"model stream closed {close_after_cancel:.2f}s after cancel"

    # --- final status and statistics (usage up to the stop is counted)
    status = wait_status(d.agent, task_id, timeout=5)
    assert status.status == agent_pb2.CANCELLED, status
    assert status.executionStatistics.outputTokens > 0, status

    # --- resume: after_seq=k gives exactly k+1..end, for any k
    for k in (0, 1, stop_i - 2, stop_i, len(events) - 1):
        again = watch_all(d.tasks, task_id, after_seq=k, timeout=10)
        assert [e.seq for e in again] == list(range(k + 1, len(events) + 1)), k
        assert [e.SerializeToString(deterministic=True) for e in again] == [
            e.SerializeToString(deterministic=True) for e in events[k:]
        ], f"replay from {k} differs from the live stream"
    assert watch_all(d.tasks, task_id, after_seq=len(events), timeout=10) == []


def test_resume_mid_task(env: SimpleNamespace) -> None:
    """A watcher that resumes from seq k while the task is live gets k+1.. with no gap."""
    d = env.d
    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction="resume me"), timeout=5
    ).task_id
    first = start_watch(d.tasks, task_id)
    early = first.wait(lambda evs: sum(kind(e) == "content" for e in evs) >= 5, 20, "content")
    k = early[-1].seq
    resumed = start_watch(d.tasks, task_id, after_seq=k)
    resumed.wait(lambda evs: len(evs) >= 5, 20, "resumed events")
    d.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task_id), timeout=5)
    first.join(15)
    resumed.join(15)
    full = first.values()
    tail = resumed.values()
    assert [e.seq for e in tail] == [e.seq for e in full if e.seq > k]
    assert [e.SerializeToString(deterministic=True) for e in tail] == [
        e.SerializeToString(deterministic=True) for e in full if e.seq > k
    ]


def test_dispatcher_enforces_stop_on_a_disobedient_commander(stack: Stack) -> None:
    """The dispatcher drops content and refuses tool calls after a stop by itself,
    and ends the RPC (ABORTED) when no `stopped` comes within the stop grace."""
    d = stack.dispatcher("--stop-grace", "1s")
    slot = RawSlot(d.channel)
    try:
        slot.hello(["planner:raw"])
        task_id, start = slot.take_task(d.tasks, "obey?", "raw")
        assert start.start.task_id == task_id
        sid = start.session_id
        assert sid, start
        watch = start_watch(d.tasks, task_id)
        for i in range(3):
            slot.send(
                interaction_pb2.UpstreamPacket(
                    session_id=sid, content=interaction_pb2.ContentChunk(text=f"before-{i} ")
                )
            )
        watch.wait(lambda evs: sum(kind(e) == "content" for e in evs) == 3, 10, "3 contents")

        # CancelTask answers once the session has ended (here: at the grace), so
        # it runs in the background while this test plays the commander.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            t_cancel = time.monotonic()
            fut = pool.submit(
                d.tasks.CancelTask, tasks_pb2.CancelTaskRequest(task_id=task_id), timeout=10
            )
            stop = slot.recv_until(lambda p: p.WhichOneof("signal") == "stop", 5)
            t_stop = time.monotonic()
            assert stop.session_id == sid
            assert stop.stop.code == interaction_pb2.STOP_CODE_CLIENT_CANCEL, stop
            # Ignore the stop: keep talking, and ask for a tool.
            for i in range(3):
                slot.send(
                    interaction_pb2.UpstreamPacket(
                        session_id=sid, content=interaction_pb2.ContentChunk(text=f"after-{i} ")
                    )
                )
                slot.send(
                    interaction_pb2.UpstreamPacket(
                        session_id=sid, thought=interaction_pb2.ThoughtChain(delta=f"after-{i}")
                    )
                )
            slot.send(
                interaction_pb2.UpstreamPacket(
                    session_id=sid,
                    tool_call=interaction_pb2.ToolCallRequest(
                        tool_name="echo", arguments_json='{"text": "x"}', call_id="late-1"
                    ),
                )
            )
            # The tool call is refused (DENIED), not executed.
            res = slot.recv_until(lambda p: p.WhichOneof("signal") == "tool_result", 5)
            assert res.tool_result.call_id == "late-1", res
            assert res.tool_result.HasField("error"), f"tool call after stop executed: {res}"
            assert res.tool_result.error.code == interaction_pb2.TOOL_ERROR_CODE_DENIED, res
            code = slot.wait_end(timeout=5)
            t_end = time.monotonic()
            resp = fut.result(timeout=10)
        assert code == grpc.StatusCode.ABORTED, (code, slot.details)
        assert resp.cancelled, resp
        assert resp.status == agent_pb2.CANCELLED, resp
        print(
            f"\nno `stopped`: stop reached the commander {(t_stop - t_cancel) * 1000:.1f} ms "
            f"after CancelTask; RPC ended ({code.name}) {t_end - t_stop:.2f}s after the stop "
            "(grace 1s)"
        )
        assert t_stop - t_cancel < 0.5, "stop did not go out at once"
        assert 0.8 <= t_end - t_stop < 3.0, f"grace not applied: {t_end - t_stop:.2f}s"

        watch.join(10)
        events = watch.values()
        texts = [e.content.text for e in events if kind(e) == "content"]
        texts += [e.thought.delta for e in events if kind(e) == "thought"]
        assert not [t for t in texts if "after-" in t], describe(events)
        assert not [e for e in events if kind(e) == "tool_call" and e.tool_call.call_id == "late-1"]
        assert kind(events[-1]) == "state" and events[-1].state.status == agent_pb2.CANCELLED
        assert wait_status(d.agent, task_id, timeout=5).status == agent_pb2.CANCELLED
    finally:
        slot.close()
