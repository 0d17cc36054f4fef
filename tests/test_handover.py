"""Session hand-over: a running task survives its dispatcher.

A commander streams a task; the dispatcher is restarted on the same address
(SIGTERM, or kill -9) with its durable store; the commander keeps the session
running, re-attaches it to the new process and resends what was not recorded.
Watchers that reconnect and resume by seq see every event exactly once, in
order. Hand-over times (kill → first event recorded again) are printed: run
with -s to see them.
"""

from __future__ import annotations

import signal
import socket
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest

from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, wait_status
from tests._procs import Timeout, wait_until
from tests.conftest import Dispatcher, Stack
from tests.scripted import tool_call

pytestmark = pytest.mark.e2e

TERMINAL = (agent_pb2.SUCCESS, agent_pb2.FAILURE, agent_pb2.CANCELLED)


@dataclass
class ResumingWatcher:
    """WatchTask that reconnects (to whatever listens on addr) and resumes after the
    last seq it saw, until the task's terminal state event."""

    addr: str
    task_id: str
    events: list[tasks_pb2.TaskEvent] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    reconnects: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def start(self) -> ResumingWatcher:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                with grpc.insecure_channel(self.addr) as ch:
                    stub = tasks_pb2_grpc.TaskServiceStub(ch)
                    req = tasks_pb2.WatchTaskRequest(
                        task_id=self.task_id, after_seq=self.last_seq()
                    )
                    try:
                        for resp in stub.WatchTask(req, timeout=60):
                            self.events.append(resp.event)
                            self.received_at.append(time.time())
                            ev = resp.event
                            if kind(ev) == "state" and ev.state.status in TERMINAL:
                                return
                    except grpc.RpcError:
                        pass
                self.reconnects += 1
                time.sleep(0.05)
            self.error = Timeout("watcher: no terminal event within 120s")
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()

    def wait(self, pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred(list(self.events)):
            if self.done.is_set() or time.monotonic() > deadline:
                raise Timeout(
                    f"{what}: not seen ({len(self.events)} events)\n{describe(self.events)}"
                )
            time.sleep(0.02)

    def join(self, timeout: float) -> list[tasks_pb2.TaskEvent]:
        if not self.done.wait(timeout):
            raise Timeout(f"watcher did not end within {timeout}s")
        if self.error is not None:
            raise self.error
        return list(self.events)


def contents(events: list[tasks_pb2.TaskEvent]) -> int:
    return sum(kind(e) == "content" for e in events)


def assert_exactly_once_in_order(events: list[tasks_pb2.TaskEvent]) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(events) + 1)), f"seqs not 1..N exactly once: {seqs}"
    last = events[-1]
    assert kind(last) == "state" and last.state.status == agent_pb2.SUCCESS, describe(events[-5:])
    # The commander's answer is the text of its own content packets: the
    # content events must spell it out exactly (nothing lost, repeated or
    # reordered), and the upstream seqs of the recorded packets only grow.
    result = [e for e in events if kind(e) == "result"]
    assert len(result) == 1, describe(events)
    text = "".join(e.content.text for e in events if kind(e) == "content")
    assert text == result[0].result.result, (len(text), len(result[0].result.result))
    ups = [e.upstream_seq for e in events if e.upstream_seq]
    assert ups == sorted(ups) and len(ups) == len(set(ups)), "upstream seqs repeated or reordered"


def restart(stack: Stack, d: Dispatcher, how: str) -> tuple[Dispatcher, float]:
    """Stops d (SIGTERM and waits for it to exit, or kill -9) and starts a new
    dispatcher on the same address and store. Returns it and the wall time of the kill."""
    d.close_channel()
    t_kill = time.time()
    if how == "sigterm":
        d.proc.signal(signal.SIGTERM)
        assert d.proc.popen.wait(timeout=20) == 0
    else:
        d.proc.kill9()
    extra = d.argv[d.argv.index("--addr-file") + 2 :]
    return stack.dispatcher(*extra, listen=d.addr), t_kill


def _streaming_task(stack: Stack, d: Dispatcher, llm_url: str) -> tuple[str, ResumingWatcher]:
    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction=f"stream for a while [{uuid.uuid4().hex[:8]}]"),
        timeout=5,
    ).task_id
    watch = ResumingWatcher(d.addr, task_id).start()
    watch.wait(lambda evs: contents(evs) >= 5, 30, "content flowing")
    return task_id, watch


def _handover_seconds(events: list[tasks_pb2.TaskEvent], t_kill: float) -> tuple[float, float]:
    """Kill → the re-attach event, and kill → the first content recorded after it."""
    reattach = next(
        i for i, e in enumerate(events) if kind(e) == "state" and "re-attached" in e.state.message
    )
    first_content = next(e for e in events[reattach:] if kind(e) == "content")
    at = events[reattach].time.ToNanoseconds() / 1e9
    content_at = first_content.time.ToNanoseconds() / 1e9
    return at - t_kill, content_at - t_kill


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_running_task_survives_dispatcher_restart(stack: Stack, how: str) -> None:
    """A task streaming continuously; its dispatcher is restarted on the same address
    (SIGTERM: drained with move; kill -9: nothing runs in it) → SUCCESS, and watchers
    that reconnect and resume by seq see 1..N exactly once, content complete and in order."""
    llm = stack.scripted(tokens_per_sec=150, tokens=600)
    d = stack.dispatcher()
    cmd = stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    task_id, watch = _streaming_task(stack, d, llm.base_url)

    d2, t_kill = restart(stack, d, how)
    status = wait_status(d2.agent, task_id, timeout=60)
    assert status.status == agent_pb2.SUCCESS, status
    events = watch.join(30)
    assert_exactly_once_in_order(events)
    reattached, first_content = _handover_seconds(events, t_kill)
    print(
        f"\n{how}: re-attached {reattached:.3f}s after the kill, first content recorded again "
        f"{first_content:.3f}s after; {len(events)} events, watcher reconnects {watch.reconnects}"
    )
    assert cmd.alive()
    # The model stream was never cut: the planner went on through the hand-over.
    assert [r["outcome"] for r in llm.streams()] == ["completed"], llm.streams()


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_handover_time_over_several_tasks(stack: Stack, how: str) -> None:
    """A restart with several sessions running: each re-attaches and completes; p50/p99
    of kill → first event recorded again."""
    n = 4
    llm = stack.scripted(tokens_per_sec=100, tokens=500)
    d = stack.dispatcher()
    stack.commander(d, llm.base_url, slots=n, wait_slots=n)
    started = [_streaming_task(stack, d, llm.base_url) for _ in range(n)]
    d2, t_kill = restart(stack, d, how)
    times: list[float] = []
    for task_id, watch in started:
        assert wait_status(d2.agent, task_id, timeout=60).status == agent_pb2.SUCCESS
        events = watch.join(30)
        assert_exactly_once_in_order(events)
        times.append(_handover_seconds(events, t_kill)[0])
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    print(f"\n{how} hand-over over {n} tasks: p50 {p50:.3f}s p99 {p99:.3f}s ({times})")


def test_handover_window_expires_when_nobody_reattaches(stack: Stack) -> None:
    """The dispatcher and its commander are both killed: after the restart the task
    waits the hand-over window for its session, then ends FAILURE with the reason —
    never RUNNING forever."""
    llm = stack.scripted(tokens_per_sec=100, tokens=1000)
    d = stack.dispatcher("--handover-window", "2s")
    cmd = stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    task_id, watch = _streaming_task(stack, d, llm.base_url)
    # The dispatcher first (so that it cannot fail the task when the commander's
    # stream ends), then its commander, before the restart.
    d.close_channel()
    t_kill = time.time()
    d.proc.kill9()
    cmd.kill9()
    d2 = stack.dispatcher(*d.argv[d.argv.index("--addr-file") + 2 :], listen=d.addr)
    # Waiting: still RUNNING (not failed at once).
    assert wait_status(d2.agent, task_id, statuses=(agent_pb2.RUNNING,), timeout=5)
    status = wait_status(d2.agent, task_id, timeout=15)
    waited = time.time() - t_kill
    assert status.status == agent_pb2.FAILURE, status
    assert "did not re-attach within 2s" in status.message, status.message
    assert 2 <= waited < 10, waited
    events = watch.join(15)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    print(f"\nno re-attach: FAILURE {waited:.2f}s after the kill: {status.message}")


def test_stop_after_handover_lands(stack: Stack) -> None:
    """A cancel after the session re-attached reaches the commander: the task ends
    CANCELLED, the watcher sees the stop and the end."""
    llm = stack.scripted(tokens_per_sec=100, tokens=2000)
    d = stack.dispatcher()
    stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    task_id, watch = _streaming_task(stack, d, llm.base_url)
    d2, _ = restart(stack, d, "kill9")
    watch.wait(
        lambda evs: (
            any(kind(e) == "state" and "re-attached" in e.state.message for e in evs)
            and contents(evs[-3:]) > 0
        ),
        30,
        "re-attached and streaming again",
    )
    out = d2.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task_id), timeout=10)
    assert out.cancelled, out
    assert wait_status(d2.agent, task_id, timeout=10).status == agent_pb2.CANCELLED
    events = watch.join(15)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert any(kind(e) == "stop" for e in events), describe(events[-5:])
    assert events[-1].state.status == agent_pb2.CANCELLED
    rec = wait_until(
        lambda: [r for r in llm.streams() if r["outcome"] != "active"], 10, "model stream closed"
    )
    assert rec[-1]["outcome"] == "client_closed", rec


def test_non_idempotent_tool_call_in_flight_gets_a_retryable_error(stack: Stack) -> None:
    """A call of a tool not declared idempotent is in flight when the dispatcher dies:
    after the re-attach the planner gets a retryable error (PROVIDER_UNAVAILABLE) for
    it — it is not run again — and the session goes on to SUCCESS."""
    llm = stack.scripted(
        [{"tool_calls": [tool_call("test.hang", {"n": 1})]}, {"content": "went on without it"}]
    )
    d = stack.dispatcher()
    stack.hanging_provider(d)
    cmd = stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    task_id = d.submit("call the hanging tool")
    watch = ResumingWatcher(d.addr, task_id).start()
    watch.wait(lambda evs: any(kind(e) == "tool_call" for e in evs), 30, "tool call in flight")
    d2, _ = restart(stack, d, "kill9")
    status = wait_status(d2.agent, task_id, timeout=60)
    assert status.status == agent_pb2.SUCCESS, status
    events = watch.join(15)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    lost = [
        e for e in events if kind(e) == "error" and e.error.code == "tool_call_lost_in_hand_over"
    ]
    assert lost and "may or may not have run" in lost[0].error.message, describe(events)
    assert sum(kind(e) == "tool_call" for e in events) == 1, "the call was issued again"
    wait_until(
        lambda: "tool test.hang failed: the call was in flight" in cmd.log_text(),
        10,
        "planner saw the retryable error",
    )
    assert "went on without it" in "".join(e.content.text for e in events if kind(e) == "content")


def test_idempotent_tool_call_in_flight_is_issued_again(stack: Stack) -> None:
    """A call of a tool declared idempotent (the built-in sleep) is in flight when the
    dispatcher dies: after the re-attach the commander issues it again under a new
    call id, the new dispatcher runs it, and the session goes on to SUCCESS."""
    llm = stack.scripted(
        [{"tool_calls": [tool_call("sleep", {"ms": 1500})]}, {"content": "slept well"}]
    )
    d = stack.dispatcher()
    stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    task_id = d.submit("sleep a little")
    watch = ResumingWatcher(d.addr, task_id).start()
    watch.wait(lambda evs: any(kind(e) == "tool_call" for e in evs), 30, "tool call in flight")
    d2, _ = restart(stack, d, "kill9")
    status = wait_status(d2.agent, task_id, timeout=60)
    assert status.status == agent_pb2.SUCCESS, status
    events = watch.join(15)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    calls = [e.tool_call for e in events if kind(e) == "tool_call"]
    assert [c.tool_name for c in calls] == ["sleep", "sleep"], describe(events)
    assert calls[0].call_id != calls[1].call_id
    results = [e.tool_result.result for e in events if kind(e) == "tool_result"]
    assert [r.call_id for r in results] == [calls[1].call_id], describe(events)
    assert not results[0].HasField("error"), results[0]
    assert "slept well" in "".join(e.content.text for e in events if kind(e) == "content")


def test_commander_with_several_addresses_reattaches_to_the_one_that_answers(
    stack: Stack,
) -> None:
    """The commander is given two addresses, the first with nobody listening: it finds
    the dispatcher, and after the dispatcher's kill -9 and restart re-attaches its
    session through the list (the dead address is tried and skipped)."""
    llm = stack.scripted(tokens_per_sec=150, tokens=400)
    d = stack.dispatcher()
    with socket.socket() as s:  # a port nobody listens on (closed right away)
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    stack.commander(f"{dead},{d.addr}", llm.base_url, slots=1)
    d.wait_slots(1, timeout=30)
    task_id, watch = _streaming_task(stack, d, llm.base_url)
    d2, t_kill = restart(stack, d, "kill9")
    assert wait_status(d2.agent, task_id, timeout=60).status == agent_pb2.SUCCESS
    events = watch.join(30)
    assert_exactly_once_in_order(events)
    print(
        f"\ntwo addresses, kill -9: re-attached {_handover_seconds(events, t_kill)[0]:.3f}s after"
    )
