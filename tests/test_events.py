"""Event fan-out, interjection and deadlines through the real commander.

- many watchers of one task see the same numbered events;
- a watcher that does not read at all neither slows the session nor loses
  events: it later reads every event, in order, with no gap; one that asked
  for batches (max_batch) gets the same events, several per response;
- a client's message interjected into a running task reaches the planner (the
  model is asked again with it) and is an event of the task;
- a task's deadline (timeout_seconds, or the seed's runningConfig.taskTimeout)
  stops it: FAILURE, STOP_CODE_DEADLINE.
"""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import grpc
import pytest

from commander._gen.dispatch.v1 import interaction_pb2, tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, start_watch, wait_status, watch_all
from tests.conftest import Stack

pytestmark = pytest.mark.e2e

FIRST = " ".join(f"word{i}" for i in range(100))  # 100 tokens
SECOND = "Understood, switching to French."
INTERJECTION = "Please answer in French instead."


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    # Default model: floods 3000 content tokens as fast as it can.
    flood = module_stack.scripted(tokens_per_sec=0, tokens=3000)
    # Two scripted turns at 50 tokens/s: room to interject during the first.
    chat = module_stack.scripted([{"content": FIRST}, {"content": SECOND}], tokens_per_sec=50)
    slow = module_stack.scripted(tokens_per_sec=50, tokens=1000)
    d = module_stack.dispatcher()
    module_stack.commander(d, flood.base_url, slots=2, wait_slots=2)
    return SimpleNamespace(d=d, flood=flood, chat=chat, slow=slow)


def _wire(events: list[tasks_pb2.TaskEvent]) -> list[bytes]:
    return [e.SerializeToString(deterministic=True) for e in events]


def test_many_watchers_and_a_stalled_one(env: SimpleNamespace) -> None:
    d = env.d
    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(instruction=f"flood [{uuid.uuid4().hex[:8]}]"), timeout=5
    ).task_id
    # A watcher that reads nothing until the task is over: its HTTP/2 window
    # fills after a few KiB, so the dispatcher cannot push to it.
    # (No BDP probing on its channel, so the window stays at 64 KiB.)
    stalled_ch = grpc.insecure_channel(d.addr, options=[("grpc.http2.bdp_probe", 0)])
    stalled = tasks_pb2_grpc.TaskServiceStub(stalled_ch).WatchTask(
        tasks_pb2.WatchTaskRequest(task_id=task_id), timeout=60
    )
    # The same with max_batch: the backlog comes several events per response.
    batched_ch = grpc.insecure_channel(d.addr, options=[("grpc.http2.bdp_probe", 0)])
    batched = tasks_pb2_grpc.TaskServiceStub(batched_ch).WatchTask(
        tasks_pb2.WatchTaskRequest(task_id=task_id, max_batch=64), timeout=60
    )
    watchers = [start_watch(d.tasks, task_id) for _ in range(10)]
    t0 = time.monotonic()
    status = wait_status(d.agent, task_id, timeout=30)
    took = time.monotonic() - t0
    assert status.status == agent_pb2.SUCCESS, status
    for w in watchers:
        w.join(30)
        assert w.error is None, w.error
    reference = watchers[0].values()
    # The model's 3000 tokens, whole (the commander folds chunks that wait
    # for its writer together, so there may be fewer content events).
    text = "".join(e.content.text for e in reference if kind(e) == "content")
    assert len(text.split()) >= 3000, len(text.split())
    assert [e.seq for e in reference] == list(range(1, len(reference) + 1))
    for w in watchers[1:]:
        assert _wire(w.values()) == _wire(reference)
    late = [r.event for r in stalled]
    stalled_ch.close()
    assert _wire(late) == _wire(reference), "the stalled watcher lost or reordered events"
    responses = list(batched)
    batched_ch.close()
    assert all(not r.HasField("event") and 1 <= len(r.events) <= 64 for r in responses)
    assert max(len(r.events) for r in responses) > 1, "a watcher behind got no batch"
    flat = [e for r in responses for e in r.events]
    assert _wire(flat) == _wire(reference), "the batched watcher lost or reordered events"
    print(f"\n{len(reference)} events to 12 watchers (two stalled) in {took:.2f}s")
    assert took < 20


def test_interjection_reaches_the_planner(env: SimpleNamespace) -> None:
    d = env.d
    marker = uuid.uuid4().hex[:8]
    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(
            instruction=f"count words [{marker}]", running_config=env.chat.model_config()
        ),
        timeout=5,
    ).task_id
    watch = start_watch(d.tasks, task_id)
    watch.wait(lambda evs: sum(kind(e) == "content" for e in evs) >= 3, 20, "first answer")
    text = f"{INTERJECTION} [{marker}]"
    resp = d.tasks.Interject(tasks_pb2.InterjectRequest(task_id=task_id, text=text), timeout=5)
    assert resp.message_id and resp.seq > 0, resp
    watch.join(30)
    events = watch.values()
    user = [e for e in events if kind(e) == "user_input"]
    assert len(user) == 1, describe(events)
    assert user[0].seq == resp.seq and user[0].user_input.text == text
    assert user[0].user_input.message_id == resp.message_id
    status = wait_status(d.agent, task_id)
    assert status.status == agent_pb2.SUCCESS, status
    assert status.result == SECOND, "the planner did not answer the interjection"
    # The model was asked a second time, with the interjected message last.
    recs = env.chat.streams(marker)
    assert [r["turn"] for r in recs] == [0, 1], recs
    assert recs[1]["last_user"] == text
    # Interjecting into a finished task is refused; into an unknown one, NOT_FOUND.
    with pytest.raises(grpc.RpcError) as info:
        d.tasks.Interject(tasks_pb2.InterjectRequest(task_id=task_id, text="late"), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        d.tasks.Interject(tasks_pb2.InterjectRequest(task_id="nope-" + marker, text="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("how", ["timeout_seconds", "taskTimeout"])
def test_deadline_stops_the_task(env: SimpleNamespace, how: str) -> None:
    d = env.d
    marker = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    if how == "timeout_seconds":
        task_id = d.tasks.SubmitTask(
            tasks_pb2.SubmitTaskRequest(
                instruction=f"too long [{marker}]",
                running_config=env.slow.model_config(),
                timeout_seconds=1,
            ),
            timeout=5,
        ).task_id
    else:
        # Seed 000's per-task taskTimeout (which the original agent ignores).
        cfg = env.slow.model_config()
        cfg.taskTimeout = 1
        task_id = d.agent.RunAgentInstructionAsync(
            agent_pb2.RunAgentInstructionRequest(
                instruction=f"too long [{marker}]", runningConfig=cfg
            ),
            timeout=5,
        ).taskId
    events = watch_all(d.tasks, task_id, timeout=20)
    took = time.monotonic() - t0
    stops = [e for e in events if kind(e) == "stop"]
    assert len(stops) == 1, describe(events)
    assert stops[0].stop.code == interaction_pb2.STOP_CODE_DEADLINE, stops[0]
    last = events[-1]
    assert kind(last) == "state" and last.state.status == agent_pb2.FAILURE, describe(events)
    assert 0.9 <= took < 5, f"deadline of 1s hit after {took:.2f}s"
    assert env.slow.wait_streams(
        marker, lambda r: r and r[0]["outcome"] == "client_closed", 5, "model stream closed"
    )
