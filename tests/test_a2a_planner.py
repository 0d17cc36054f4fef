"""The commander's ``a2a`` planner against a remote agent built with the a2a-sdk server.

The remote agent (tests/_a2a_remote.py, its own process) streams a story word
by word; the story holds the phrase "launch codes", which a policy of the
dispatcher stops. The planner relays the remote stream as our events, so the
policy sees them; our stop must reach the remote agent as a CancelTask within
100 ms of the dispatcher's stop event (both clocks are this machine's), and
the remote task must end CANCELED.
"""

from __future__ import annotations

import re
import uuid
from types import SimpleNamespace

import anyio
import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.types.a2a_pb2 import GetTaskRequest, TaskState

from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, start_watch, watch_all
from tests._procs import PYTHON, Proc, spawn, wait_until
from tests.conftest import Dispatcher, Stack

STOP_REACHES_REMOTE_S = 0.100

POLICY = """\
version: 1
rules:
  - id: no-launch-codes
    phrases: ["launch codes"]
    action: stop
    reason: forbidden phrase
"""


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    remote = spawn("a2a-remote", [PYTHON, "-m", "tests._a2a_remote", "20"], module_stack.workdir)
    module_stack.procs.append(remote)

    def listening() -> str | None:
        m = re.search(r"^LISTENING (\S+)$", remote.log_text(), re.M)
        return m.group(1) if m else None

    url = wait_until(listening, 20, "remote A2A agent listening", procs=[remote])
    assert url
    policy = module_stack.workdir / "a2a-planner-policy.yaml"
    policy.write_text(POLICY)
    llm = module_stack.scripted()  # the commander needs a model; the a2a planner uses none
    d = module_stack.dispatcher("--policy-file", str(policy))
    module_stack.commander(d, llm.base_url, slots=2, wait_slots=2, env={"A2A_AGENTS": url})
    return SimpleNamespace(d=d, remote=remote, url=url)


def submit(d: Dispatcher, url: str) -> str:
    req = tasks_pb2.SubmitTaskRequest(
        instruction=f"Tell me a story [{uuid.uuid4().hex[:8]}]",
        planner="a2a",
        labels={"a2a_agent": url},
    )
    return str(d.tasks.SubmitTask(req, timeout=5).task_id)


def remote_lines(remote: Proc, word: str) -> list[list[str]]:
    return [ln.split() for ln in remote.log_text().splitlines() if ln.startswith(word + " ")]


def remote_task_of(remote: Proc, before: int) -> str:
    """The id of the remote task started after the first `before` EXECUTE lines."""
    found = wait_until(
        lambda: remote_lines(remote, "EXECUTE")[before:], 20, "remote task started", procs=[remote]
    )
    return str(found[0][1])


async def remote_state(url: str, task_id: str) -> int:
    async with httpx.AsyncClient(timeout=10) as hc:
        client = await ClientFactory(ClientConfig(httpx_client=hc)).create_from_url(url)
        async with client:
            return int((await client.get_task(GetTaskRequest(id=task_id))).status.state)


def test_policy_stop_cancels_the_remote_task_within_100ms(env: SimpleNamespace) -> None:
    d, remote = env.d, env.remote
    before = len(remote_lines(remote, "EXECUTE"))
    task_id = submit(d, env.url)
    events = watch_all(d.tasks, task_id, timeout=30)
    rtask = remote_task_of(remote, before)

    # The remote stream became our events, up to the phrase.
    kinds = [kind(e) for e in events]
    assert "content" in kinds, describe(events)
    stop = next(e for e in events if kind(e) == "stop")
    assert stop.stop.code == ipb.STOP_CODE_POLICY and stop.stop.rule_id == "no-launch-codes"
    assert all(e.seq < stop.seq for e in events if kind(e) == "content"), describe(events)
    streamed = "".join(e.content.text for e in events if kind(e) == "content")
    assert "launch" in streamed and "humming" not in streamed, streamed
    assert events[-1].state.status == agent_pb2.FAILURE, describe(events)
    assert "no-launch-codes" in events[-1].state.message

    # The remote agent saw the CancelTask, within 100 ms of our stop.
    (cancel,) = wait_until(
        lambda: [ln for ln in remote_lines(remote, "CANCEL") if ln[1] == rtask],
        10,
        "remote agent saw the cancel",
        procs=[remote],
    )
    stop_at = stop.time.seconds + stop.time.nanos / 1e9
    lag = float(cancel[2]) - stop_at
    print(f"the remote agent saw the cancel {lag * 1000:.1f} ms after the stop event")
    assert lag < STOP_REACHES_REMOTE_S, (
        f"the cancel reached the remote agent {lag * 1000:.1f} ms after the stop"
    )
    assert anyio.run(remote_state, env.url, rtask) == TaskState.TASK_STATE_CANCELED


def test_client_cancel_cancels_the_remote_task(env: SimpleNamespace) -> None:
    d, remote = env.d, env.remote
    before = len(remote_lines(remote, "EXECUTE"))
    task_id = submit(d, env.url)
    watch = start_watch(d.tasks, task_id)
    watch.wait(lambda evs: any(kind(e) == "content" for e in evs), 20, "remote content relayed")
    rtask = remote_task_of(remote, before)
    resp = d.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task_id), timeout=10)
    assert resp.cancelled and resp.status == agent_pb2.CANCELLED, resp
    watch.join(10)
    events = watch.values()
    assert events[-1].state.status == agent_pb2.CANCELLED, describe(events)
    wait_until(
        lambda: [ln for ln in remote_lines(remote, "CANCEL") if ln[1] == rtask],
        10,
        "remote agent saw the cancel",
        procs=[remote],
    )
    assert anyio.run(remote_state, env.url, rtask) == TaskState.TASK_STATE_CANCELED


def test_agent_not_on_the_list_is_refused(env: SimpleNamespace) -> None:
    d, remote = env.d, env.remote
    before = len(remote_lines(remote, "EXECUTE"))
    task_id = submit(d, "http://127.0.0.1:9/elsewhere")
    events = watch_all(d.tasks, task_id, timeout=30)
    assert events[-1].state.status == agent_pb2.FAILURE, describe(events)
    assert "not on --a2a-agents" in events[-1].state.message
    assert len(remote_lines(remote, "EXECUTE")) == before
