"""Policy-driven interruption (issue 3) through real processes.

The dispatcher binary runs with `--policy-file` pointing at a YAML file this
module writes; a real `python -m commander` runs the chat planner against
scriptedllm, which streams slowly (one word per chunk) and records whether
the client closed each stream; `tests/_gui_provider.py` serves GUI-like
`computer.*` tools. Cases are told apart by the task's `tenant` label, which
the rules look at.

- a phrase rule stops a streaming generation in mid-sentence: clients see the
  content up to the chunk before the one that completes the phrase, then
  `PolicyDecision{STOP}` and the stop with the rule's id, then only
  `stopped`/usage and FAILURE; the model server saw its stream closed (also
  for the phrase in the reasoning stream, and for a task's own policy_yaml);
- a deny rule refuses `computer.click` (DENIED, naming the rule) and the task
  goes on to SUCCESS;
- a hold rule parks the call until `TaskService.ApproveToolCall` approves it
  (it runs), rejects it (DENIED, here through `dispatchctl approve --reject`),
  the hold times out (DENIED), or the task is cancelled meanwhile (CANCELLED);
- rewriting the policy file while sessions stream drops no stream and loses no
  event; a broken file is rejected and the policy in force stays.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from commander._gen.dispatch.v1 import interaction_pb2, tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests import _procs
from tests._client import (
    CONTENT_KINDS,
    CONTENT_STAGES,
    describe,
    kind,
    start_task_stream,
    start_watch,
    wait_status,
    watch_all,
)
from tests._procs import Proc, wait_until
from tests.conftest import Dispatcher, Stack
from tests.scripted import ScriptedLLM, tool_call

pytestmark = pytest.mark.e2e

E = interaction_pb2
T = tasks_pb2

PHRASE = "launch codes"
# scriptedllm streams one word per chunk (with the space before it), so the
# phrase arrives split: "... the launch" | " codes" | " of the ...".
STORY = (
    "Once upon a time the night operator of the old station walked to the vault "
    "and read the launch codes out loud while the radio kept humming softly and the "
    "rain went on falling over the empty yard until morning came at last to everyone"
)
BEFORE_PHRASE = STORY[: STORY.index(" codes")]  # ends with " launch"
STORY_RATE = 20  # tokens/s: about 2 s to the phrase, 2.5 s more after it

THOUGHT = "The user wants the LAUNCH CODES so I will look them up in the vault now"
CLICK_ARGS = {"x": 120, "y": 48}
GUI_INTRO = "Let me click the button."
GUI_AFTER = "The GUI step is over and the task goes on to the end."

POLICY = """\
version: 1
hold_timeout: 30s

rules:
  - id: no-launch-codes
    phrases: ["launch codes"]
    action: stop
    reason: forbidden phrase

  - id: no-gui-for-tenant
    when: tool_name.startsWith("computer.") && tenant == "deny-gui"
    action: deny
    reason: GUI actions are not allowed for this tenant

  - id: gui-needs-approval
    when: tool_name.startsWith("computer.") && tenant == "hold-gui"
    action: hold
    reason: a person must approve GUI actions
    hold_timeout: 30s

  - id: gui-approval-expires
    when: tool_name.startsWith("computer.") && tenant == "hold-short"
    action: hold
    hold_timeout: 1500ms

tests:
  - name: phrase split across chunks
    packets:
      - {kind: content, text: "read the launch"}
      - {kind: content, text: " codes"}
    expect: {action: stop, rule: no-launch-codes}
  - name: GUI click denied for the tenant
    state: {tenant: deny-gui}
    packets: [{kind: tool_call, tool: computer.click, args: {x: 1, y: 2}}]
    expect: {action: deny, rule: no-gui-for-tenant}
  - name: GUI click held for the tenant
    state: {tenant: hold-gui}
    packets: [{kind: tool_call, tool: computer.click, args: {x: 1, y: 2}}]
    expect: {action: hold, rule: gui-needs-approval}
"""


def write_policy(path: Path, text: str) -> None:
    """Replaces the file by rename, as editors and config-map updates do."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    policy = module_stack.workdir / "policy.yaml"
    write_policy(policy, POLICY)
    story = module_stack.scripted([{"content": STORY}], tokens_per_sec=STORY_RATE)
    gui = module_stack.scripted(
        [
            {"content": GUI_INTRO, "tool_calls": [tool_call("computer.click", CLICK_ARGS)]},
            {"content": GUI_AFTER},
        ],
        tokens_per_sec=100,
    )
    # The phrase arrives in the reasoning stream (thoughts), split over chunks;
    # the answer would follow it.
    thinker = module_stack.scripted(
        [{"reasoning": THOUGHT, "content": "A harmless answer."}], tokens_per_sec=50
    )
    d = module_stack.dispatcher("--policy-file", str(policy))
    provider = module_stack.gui_provider(d)
    module_stack.commander(d, story.base_url, slots=3, wait_slots=3)
    return SimpleNamespace(
        d=d, story=story, gui=gui, thinker=thinker, provider=provider, policy=policy
    )


def contiguous(events: list[T.TaskEvent]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), describe(events)


def policy_events(events: list[T.TaskEvent]) -> list[T.PolicyDecision]:
    return [e.policy for e in events if kind(e) == "policy"]


def result_of(events: list[T.TaskEvent], call_id: str) -> T.TaskEvent:
    found = [
        e for e in events if kind(e) == "tool_result" and e.tool_result.result.call_id == call_id
    ]
    assert len(found) == 1, f"{len(found)} results for {call_id}\n{describe(events)}"
    return found[0]


def invoked(provider: Proc, call_id: str) -> bool:
    return any(
        line.startswith("INVOKED ") and line.split()[3] == call_id
        for line in provider.log_text().splitlines()
    )


def dispatchctl(d: Dispatcher, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs bin/dispatchctl against d."""
    exe = _procs.ensure_binary("dispatchctl")
    return subprocess.run(
        [str(exe), "--addr", d.addr, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )


def content_after(events: list[T.TaskEvent], seq: int) -> str:
    return "".join(e.content.text for e in events if kind(e) == "content" and e.seq > seq)


# ------------------------------------------------------------------ stop


def test_phrase_rule_stops_streaming_generation_mid_sentence(env: SimpleNamespace) -> None:
    d, llm = env.d, env.story
    marker = f"[{uuid.uuid4().hex[:10]}]"
    task_id = d.submit(f"Tell me a story {marker}")
    native = start_watch(d.tasks, task_id)
    seed = start_task_stream(d.agent, task_id)
    native.join(30)
    seed.join(30)
    assert native.error is None, native.error
    assert seed.error is None, seed.error
    events = native.values()
    contiguous(events)
    kinds = [kind(e) for e in events]

    # PolicyDecision{STOP} then StopSignal{POLICY, rule}: one each, adjacent.
    assert kinds.count("policy") == 1 and kinds.count("stop") == 1, describe(events)
    pol_i = kinds.index("policy")
    pd = events[pol_i].policy
    assert pd.action == T.POLICY_ACTION_STOP, pd
    assert pd.rule_id == "no-launch-codes", pd
    assert pd.packet_kind == "content", pd
    assert pd.reason == "forbidden phrase", pd
    assert pd.policy_version, pd
    assert kinds[pol_i + 1] == "stop", describe(events)
    stop = events[pol_i + 1].stop
    assert stop.code == E.STOP_CODE_POLICY, stop
    assert stop.rule_id == "no-launch-codes", stop

    # Before them: the story up to the chunk before the one completing the phrase.
    before = "".join(e.content.text for e in events[:pol_i] if kind(e) == "content")
    assert PHRASE not in before.lower(), before
    assert STORY.startswith(before), before
    assert before == BEFORE_PHRASE, f"got {before!r}, want {BEFORE_PHRASE!r}"
    assert before.endswith(" launch")  # half the phrase was seen, legitimately

    # After them: nothing but the commander's stopped (and usage), then FAILURE.
    after = events[pol_i + 2 :]
    leaked = [e for e in after if kind(e) in (*CONTENT_KINDS, "tool_call")]
    assert not leaked, f"output after the stop:\n{describe(leaked)}"
    assert {kind(e) for e in after} <= {"stopped", "usage", "state"}, describe(after)
    assert [kind(e) for e in after].count("stopped") == 1, describe(after)
    last = events[-1]
    assert kind(last) == "state" and last.state.status == agent_pb2.FAILURE, describe(events)
    # The terminal message is the stop's reason (docs/protocol.md); the rule id
    # is carried by the PolicyDecision and StopSignal events above.
    expected = "policy rule no-launch-codes: forbidden phrase"
    assert last.state.message == stop.reason == expected, last.state

    # The seed-000 projection tells the same story, in stages.
    stream = seed.values()
    stages = [s.stage for s in stream]
    assert stages.count("policy") == 1 and stages.count("stop") == 1, stages
    p_i = stages.index("policy")
    assert stream[p_i].message.startswith("stop on content by rule no-launch-codes"), stream[p_i]
    assert stages[p_i + 1] == "stop", stages
    assert not [s for s in stages[p_i:] if s in CONTENT_STAGES], stages[p_i:]
    assert "".join(s.message for s in stream[:p_i] if s.stage == "content") == before
    assert stages[-1] == "failure", stages[-5:]
    assert stream[-1].message == expected, stream[-1]

    # The model server saw its stream closed by the client, long before its end.
    recs = llm.wait_streams(marker, lambda r: r and r[0]["outcome"] != "active", 5, "stream end")
    assert len(recs) == 1, recs
    assert recs[0]["outcome"] == "client_closed", recs[0]
    assert recs[0]["tokens"] < len(STORY.split()), recs[0]

    # Status, GetTask, and a replay from the log agree.
    status = wait_status(d.agent, task_id, timeout=5)
    assert status.status == agent_pb2.FAILURE, status
    assert status.message == expected, status
    task = d.tasks.GetTask(T.GetTaskRequest(task_id=task_id), timeout=5).task
    assert task.status == agent_pb2.FAILURE and task.message == expected, task
    replay = watch_all(d.tasks, task_id, timeout=10)
    assert [e.SerializeToString(deterministic=True) for e in replay] == [
        e.SerializeToString(deterministic=True) for e in events
    ]

    stopped_ev = next(e for e in after if kind(e) == "stopped")
    stop_to_stopped = (
        stopped_ev.time.ToNanoseconds() - events[pol_i + 1].time.ToNanoseconds()
    ) / 1e6
    closed_after = (recs[0]["end_us"] - events[pol_i].time.ToMicroseconds()) / 1e3
    print(
        f"\npolicy stop: {len(before.split())} words shown, stop→stopped {stop_to_stopped:.1f} ms "
        f"(dispatcher clock); model stream closed {closed_after:.1f} ms after the decision; "
        f"{recs[0]['tokens']}/{len(STORY.split())} tokens generated; state: {last.state.message!r}"
    )
    assert closed_after < 2000, closed_after


def test_gui_call_of_another_tenant_runs(env: SimpleNamespace) -> None:
    """Control case: the same GUI script for a tenant no rule names runs unhindered."""
    unhindered_click(env)


def unhindered_click(env: SimpleNamespace) -> None:
    """Runs the GUI script for tenant "ok" (no rule names it): its computer.click runs
    on the provider and the task succeeds."""
    d = env.d
    task_id = d.submit(f"Say something [{uuid.uuid4().hex[:8]}]", env.gui, tenant="ok")
    events = watch_all(d.tasks, task_id, timeout=30)
    contiguous(events)
    assert policy_events(events) == [], describe(events)
    call = next(e.tool_call for e in events if kind(e) == "tool_call")
    res = result_of(events, call.call_id).tool_result
    assert not res.result.HasField("error"), res
    assert invoked(env.provider, call.call_id)
    assert events[-1].state.status == agent_pb2.SUCCESS, describe(events)


# ------------------------------------------------------------------ deny


def test_deny_rule_refuses_gui_action_and_task_goes_on(env: SimpleNamespace) -> None:
    d = env.d
    task_id = d.submit(f"Click it [{uuid.uuid4().hex[:8]}]", env.gui, tenant="deny-gui")
    events = watch_all(d.tasks, task_id, timeout=30)
    contiguous(events)
    calls = [e for e in events if kind(e) == "tool_call"]
    assert len(calls) == 1 and calls[0].tool_call.tool_name == "computer.click", describe(events)
    call_id = calls[0].tool_call.call_id

    pds = policy_events(events)
    assert len(pds) == 1, describe(events)
    pd = pds[0]
    assert pd.action == T.POLICY_ACTION_DENY and pd.rule_id == "no-gui-for-tenant", pd
    assert pd.call_id == call_id and pd.tool_name == "computer.click", pd
    assert pd.packet_kind == "tool_call", pd

    res_ev = result_of(events, call_id)
    err = res_ev.tool_result.result.error
    assert err.code == E.TOOL_ERROR_CODE_DENIED, res_ev
    assert "no-gui-for-tenant" in err.message, err
    assert "not allowed for this tenant" in err.message, err
    pol_seq = next(e.seq for e in events if kind(e) == "policy")
    assert calls[0].seq < pol_seq < res_ev.seq, describe(events)
    assert not invoked(env.provider, call_id), env.provider.log_text()

    # The session went on: the next model turn streamed, then SUCCESS.
    assert content_after(events, res_ev.seq) == GUI_AFTER, describe(events)
    assert "stop" not in [kind(e) for e in events]
    assert kind(events[-1]) == "state" and events[-1].state.status == agent_pb2.SUCCESS
    assert wait_status(d.agent, task_id).result == GUI_AFTER


# ------------------------------------------------------------------ hold


def _held(d: Dispatcher, tenant: str, llm: ScriptedLLM) -> tuple[str, object, T.TaskEvent]:
    """Submits a GUI task and waits for its click to be held; returns the watch too."""
    task_id = d.submit(f"Click it [{uuid.uuid4().hex[:8]}]", llm, tenant=tenant)
    watch = start_watch(d.tasks, task_id)
    evs = watch.wait(
        lambda evs: any(
            kind(e) == "policy" and e.policy.action == T.POLICY_ACTION_HOLD for e in evs
        ),
        20,
        "hold decision",
    )
    hold_ev = next(e for e in evs if kind(e) == "policy")
    return task_id, watch, hold_ev


def test_hold_waits_for_approval_then_runs(env: SimpleNamespace) -> None:
    d = env.d
    task_id, watch, hold_ev = _held(d, "hold-gui", env.gui)
    hold = hold_ev.policy
    call_id = hold.call_id
    assert hold.rule_id == "gui-needs-approval" and hold.tool_name == "computer.click", hold
    assert hold.hold_outcome == T.HOLD_OUTCOME_UNSPECIFIED, hold
    wait_s = (hold.hold_deadline.ToNanoseconds() - hold_ev.time.ToNanoseconds()) / 1e9
    assert 29 <= wait_s <= 31, f"hold deadline {wait_s:.1f}s after the hold, want 30s"

    # The call waits: nothing runs and no result comes while nobody approves.
    # Barrier, not a sleep: a click of another task, submitted after the hold,
    # runs on the same provider. The dispatcher sends a provider its invocations
    # on one stream, in order, and the provider logs each as it reads it; so once
    # the later click is logged, a held call that had been let through would be
    # logged too.
    unhindered_click(env)
    assert not invoked(env.provider, call_id), env.provider.log_text()
    assert not [e for e in watch.values() if kind(e) == "tool_result"], describe(watch.values())
    assert wait_status(d.agent, task_id, [agent_pb2.RUNNING], timeout=1).status == agent_pb2.RUNNING

    t0 = time.monotonic()
    resp = d.tasks.ApproveToolCall(
        T.ApproveToolCallRequest(
            task_id=task_id, call_id=call_id, approve=True, reason="ok by test"
        ),
        timeout=5,
    )
    assert resp.outcome == T.HOLD_OUTCOME_APPROVED, resp
    watch.join(30)
    took = time.monotonic() - t0
    events = watch.values()
    contiguous(events)

    by_seq = {e.seq: e for e in events}
    approved = by_seq[resp.seq]
    assert kind(approved) == "policy", describe(events)
    assert approved.policy.action == T.POLICY_ACTION_ALLOW, approved
    assert approved.policy.hold_outcome == T.HOLD_OUTCOME_APPROVED, approved
    assert approved.policy.call_id == call_id and "ok by test" in approved.policy.reason
    res_ev = result_of(events, call_id)
    assert res_ev.seq > resp.seq
    assert not res_ev.tool_result.result.HasField("error"), res_ev
    assert '"done": "computer.click"' in res_ev.tool_result.result.result_json, res_ev
    assert res_ev.tool_result.executor == "gui-provider", res_ev
    assert invoked(env.provider, call_id)
    assert content_after(events, res_ev.seq) == GUI_AFTER, describe(events)
    assert events[-1].state.status == agent_pb2.SUCCESS, describe(events)
    print(f"\nhold approved: task ended {took * 1000:.0f} ms after ApproveToolCall")

    # The call is no longer held; the task no longer runs.
    with pytest.raises(grpc.RpcError) as exc:
        d.tasks.ApproveToolCall(
            T.ApproveToolCallRequest(task_id=task_id, call_id=call_id, approve=True), timeout=5
        )
    assert exc.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


def test_hold_rejected_is_denied_and_task_goes_on(env: SimpleNamespace) -> None:
    d = env.d
    task_id, watch, hold_ev = _held(d, "hold-gui", env.gui)
    call_id = hold_ev.policy.call_id
    # An unknown call_id is NOT_FOUND and does not touch the held one.
    with pytest.raises(grpc.RpcError) as exc:
        d.tasks.ApproveToolCall(
            T.ApproveToolCallRequest(task_id=task_id, call_id="no-such-call", approve=True),
            timeout=5,
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND, exc.value
    # Rejected from the command line: `dispatchctl approve --reject`.
    res = dispatchctl(d, "approve", task_id, call_id, "--reject", "--reason", "not on my screen")
    assert res.returncode == 0, res
    m = re.fullmatch(rf"rejected: call {call_id} of task {task_id} \(event (\d+)\)\n", res.stdout)
    assert m, res.stdout
    watch.join(30)
    events = watch.values()
    contiguous(events)
    rejected = next(e for e in events if e.seq == int(m.group(1)))
    assert rejected.policy.action == T.POLICY_ACTION_DENY, rejected
    assert rejected.policy.hold_outcome == T.HOLD_OUTCOME_REJECTED, rejected
    res_ev = result_of(events, call_id)
    err = res_ev.tool_result.result.error
    assert err.code == E.TOOL_ERROR_CODE_DENIED, res_ev
    assert "gui-needs-approval" in err.message and "not on my screen" in err.message, err
    assert not invoked(env.provider, call_id)
    assert content_after(events, res_ev.seq) == GUI_AFTER, describe(events)
    assert events[-1].state.status == agent_pb2.SUCCESS, describe(events)

    # `dispatchctl watch` shows the decisions readably.
    res = dispatchctl(d, "watch", task_id)
    assert res.returncode == 0, res
    assert (
        f"!! policy hold [gui-needs-approval]: computer.click [call {call_id}]: "
        "a person must approve GUI actions" in res.stdout
    ), res.stdout
    assert f"dispatchctl approve {task_id} {call_id} [--reject]" in res.stdout, res.stdout
    assert (
        f"!! policy rejected [gui-needs-approval]: computer.click [call {call_id}]: "
        "rejected by a client: not on my screen" in res.stdout
    ), res.stdout
    # Resolved already: NOT_FOUND, exit 1.
    res = dispatchctl(d, "approve", task_id, call_id)
    assert res.returncode == 1 and ("NotFound" in res.stderr or "FailedPrecondition" in res.stderr)


def test_hold_times_out_and_is_denied(env: SimpleNamespace) -> None:
    d = env.d
    task_id, watch, hold_ev = _held(d, "hold-short", env.gui)
    call_id = hold_ev.policy.call_id
    assert hold_ev.policy.rule_id == "gui-approval-expires", hold_ev
    watch.join(30)
    events = watch.values()
    contiguous(events)
    pds = [e for e in events if kind(e) == "policy"]
    assert len(pds) == 2, describe(events)
    timed_out = pds[1]
    assert timed_out.policy.action == T.POLICY_ACTION_DENY, timed_out
    assert timed_out.policy.hold_outcome == T.HOLD_OUTCOME_TIMED_OUT, timed_out
    assert timed_out.policy.call_id == call_id
    waited = (timed_out.time.ToNanoseconds() - hold_ev.time.ToNanoseconds()) / 1e9
    assert 1.4 <= waited < 5, f"hold timed out after {waited:.2f}s, want 1.5s"
    res_ev = result_of(events, call_id)
    err = res_ev.tool_result.result.error
    assert err.code == E.TOOL_ERROR_CODE_DENIED and "timed out" in err.message, err
    assert "gui-approval-expires" in err.message, err
    assert not invoked(env.provider, call_id)
    assert content_after(events, res_ev.seq) == GUI_AFTER, describe(events)
    assert events[-1].state.status == agent_pb2.SUCCESS, describe(events)
    # Too late to approve.
    with pytest.raises(grpc.RpcError) as exc:
        d.tasks.ApproveToolCall(
            T.ApproveToolCallRequest(task_id=task_id, call_id=call_id, approve=True), timeout=5
        )
    assert exc.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


# ------------------------------------------------------------------ reload


LOAD_SESSIONS = 8
LOAD_TOKENS = 200
LOAD_RATE = 100  # tokens/s: each session streams for about 2 s
SESAME = "open sesame"


def _reload_policy(step: int) -> str:
    """Valid policies that differ and never fire on the generated filler text."""
    rules = [
        '  - id: no-launch-codes\n    phrases: ["launch codes"]\n    action: stop\n',
        f'  - id: step-{step}\n    when: kind == "error" && text.contains("never-{step}")\n'
        "    action: stop\n",
    ]
    if step >= 3:
        rules.append(f'  - id: reload-v{step}\n    phrases: ["{SESAME}"]\n    action: stop\n')
    return f"version: 1\ntext_window: {256 * step}\nrules:\n" + "".join(rules)


def test_reload_under_load_drops_no_stream(stack: Stack) -> None:
    policy = stack.workdir / "policy.yaml"
    write_policy(policy, _reload_policy(1))
    filler = stack.scripted(tokens_per_sec=LOAD_RATE, tokens=LOAD_TOKENS)
    probe_llm = stack.scripted(
        [{"content": f"to get in just say {SESAME} and walk through the door"}],
        tokens_per_sec=50,
    )
    d = stack.dispatcher("--policy-file", str(policy), "--policy-poll", "100ms")
    stack.commander(d, filler.base_url, slots=LOAD_SESSIONS, wait_slots=LOAD_SESSIONS)

    def reloads() -> list[str]:
        return [x for x in d.proc.log_text().splitlines() if "policy reloaded" in x]

    marker = uuid.uuid4().hex[:8]
    ids = [d.submit(f"load {marker} #{i}") for i in range(LOAD_SESSIONS)]
    watches = {t: start_watch(d.tasks, t) for t in ids}
    for w in watches.values():
        w.wait(lambda evs: sum(kind(e) == "content" for e in evs) >= 5, 20, "streaming")

    # Rewrite the file while every session streams: two good versions, then a
    # broken one, each seen by the watcher before the next.
    versions = []
    for step in (2, 3):
        n = len(reloads())
        write_policy(policy, _reload_policy(step))
        line = wait_until(
            lambda n=n: len(reloads()) > n and reloads()[-1], 5, f"reload {step}", procs=[d.proc]
        )
        versions.append(re.search(r"version=(\S+)", line).group(1))  # type: ignore[union-attr]
    write_policy(policy, _reload_policy(4).replace("action: stop", "action: explode", 1))
    wait_until(
        lambda: "policy reload rejected" in d.proc.log_text(), 5, "rejection", procs=[d.proc]
    )
    live = [t for t, w in watches.items() if not w.done.is_set()]
    assert len(live) == LOAD_SESSIONS, "sessions ended before the reloads were done"

    for w in watches.values():
        w.join(30)
    expected = "".join(" " * (i > 0) + w for i, w in enumerate(_filler_words(LOAD_TOKENS)))
    for task_id, w in watches.items():
        assert w.error is None, (task_id, w.error)
        events = w.values()
        contiguous(events)
        assert kind(events[-1]) == "state" and events[-1].state.status == agent_pb2.SUCCESS, (
            describe(events[-5:])
        )
        assert not [e for e in events if kind(e) in ("policy", "stop")], describe(events)
        text = "".join(e.content.text for e in events if kind(e) == "content")
        assert text == expected, f"{task_id}: {len(text)} of {len(expected)} chars"
        replay = watch_all(d.tasks, task_id, timeout=10)
        assert [e.SerializeToString(deterministic=True) for e in replay] == [
            e.SerializeToString(deterministic=True) for e in events
        ]
    recs = filler.streams(marker)
    assert len(recs) == LOAD_SESSIONS and {r["outcome"] for r in recs} == {"completed"}, recs

    # The last good version (step 3) is in force, the broken one was not taken:
    # its phrase rule stops a new task, and the decision names that version.
    probe = d.submit(f"probe {marker}", probe_llm)
    events = watch_all(d.tasks, probe, timeout=30)
    pds = policy_events(events)
    assert len(pds) == 1 and pds[0].rule_id == "reload-v3", describe(events)
    assert pds[0].policy_version == versions[-1], (pds[0].policy_version, versions)
    assert events[-1].state.status == agent_pb2.FAILURE
    text = "".join(e.content.text for e in events if kind(e) == "content")
    assert SESAME not in text and text.endswith(" open"), text
    # No ChatStream was cut and reopened: the slots connected once each.
    connected = d.proc.log_text().count("commander slot connected")
    assert connected == LOAD_SESSIONS, f"{connected} slot connections"
    assert d.proc.alive()
    print(
        f"\nreload under load: {LOAD_SESSIONS} sessions x {LOAD_TOKENS} tokens, 2 reloads + 1 "
        f"rejected file mid-stream; all complete, versions {versions}"
    )


def _filler_words(n: int) -> list[str]:
    """scriptedllm's generated text (cmd/scriptedllm/script.go `words`)."""
    words = (
        "the dispatcher relays every token of the model to each client "
        "that watches the task and stops the stream at once when asked"
    ).split()
    return [words[i % len(words)] for i in range(n)]


def test_stop_while_held_cancels_the_call(env: SimpleNamespace) -> None:
    """A client's cancel while a call is held resolves the hold CANCELLED; it never runs."""
    d = env.d
    task_id, watch, hold_ev = _held(d, "hold-gui", env.gui)
    call_id = hold_ev.policy.call_id
    resp = d.tasks.CancelTask(T.CancelTaskRequest(task_id=task_id, reason="test"), timeout=10)
    assert resp.cancelled, resp
    watch.join(15)
    events = watch.values()
    contiguous(events)
    pds = [e.policy for e in events if kind(e) == "policy"]
    assert [p.hold_outcome for p in pds] == [
        T.HOLD_OUTCOME_UNSPECIFIED,
        T.HOLD_OUTCOME_CANCELLED,
    ], describe(events)
    res_ev = result_of(events, call_id)
    assert res_ev.tool_result.result.error.code == E.TOOL_ERROR_CODE_CANCELLED, res_ev
    assert not invoked(env.provider, call_id)
    assert events[-1].state.status == agent_pb2.CANCELLED, describe(events)
    with pytest.raises(grpc.RpcError) as exc:
        d.tasks.ApproveToolCall(
            T.ApproveToolCallRequest(task_id=task_id, call_id=call_id, approve=True), timeout=5
        )
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.value


def test_task_policy_tightens_the_global_one(env: SimpleNamespace) -> None:
    """A task's own policy_yaml adds a phrase rule for that task only."""
    d = env.d
    own = 'rules:\n  - id: task-no-operator\n    phrases: ["night operator"]\n    action: stop\n'
    req = T.SubmitTaskRequest(instruction=f"story [{uuid.uuid4().hex[:8]}]", policy_yaml=own)
    task_id = d.tasks.SubmitTask(req, timeout=5).task_id
    events = watch_all(d.tasks, task_id, timeout=30)
    contiguous(events)
    pds = policy_events(events)
    assert [(p.action, p.rule_id) for p in pds] == [(T.POLICY_ACTION_STOP, "task-no-operator")], (
        describe(events)
    )
    text = "".join(e.content.text for e in events if kind(e) == "content")
    assert text == STORY[: STORY.index(" operator")], text
    assert events[-1].state.status == agent_pb2.FAILURE

    # A task policy that does not compile is refused at submission.
    bad = T.SubmitTaskRequest(instruction="x", policy_yaml="rulez: []\n")
    with pytest.raises(grpc.RpcError) as exc:
        d.tasks.SubmitTask(bad, timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value
    assert "rulez" in (exc.value.details() or ""), exc.value.details()


def test_phrase_rule_watches_the_thought_stream_too(env: SimpleNamespace) -> None:
    """The phrase (any case) split over reasoning chunks stops the session on a thought."""
    d = env.d
    marker = f"[{uuid.uuid4().hex[:8]}]"
    task_id = d.submit(f"Think first {marker}", env.thinker)
    events = watch_all(d.tasks, task_id, timeout=30)
    contiguous(events)
    pds = policy_events(events)
    assert [(p.rule_id, p.packet_kind) for p in pds] == [("no-launch-codes", "thought")], describe(
        events
    )
    pol_seq = next(e.seq for e in events if kind(e) == "policy")
    thought = "".join(e.thought.delta for e in events if kind(e) == "thought")
    assert thought == THOUGHT[: THOUGHT.index(" CODES")], thought
    assert not [e for e in events if e.seq > pol_seq and kind(e) in (*CONTENT_KINDS, "tool_call")]
    assert not [e for e in events if kind(e) == "content" and e.content.text], describe(events)
    assert events[-1].state.status == agent_pb2.FAILURE, describe(events)
    recs = env.thinker.wait_streams(
        marker, lambda r: r and r[0]["outcome"] != "active", 5, "stream end"
    )
    assert recs[0]["outcome"] == "client_closed", recs[0]


def test_phrase_stop_through_seed_run_agent_instruction(env: SimpleNamespace) -> None:
    """The seed-000 RunAgentInstruction stream shows the same cut: no phrase, then
    the policy decision, the stop and the failure."""
    d = env.d
    req = agent_pb2.RunAgentInstructionRequest(instruction=f"Story [{uuid.uuid4().hex[:8]}]")
    stream = list(d.agent.RunAgentInstruction(req, timeout=30))
    stages = [s.stage for s in stream]
    assert stages.count("policy") == 1 and stages.count("stop") == 1, stages
    p_i = stages.index("policy")
    content = "".join(s.message for s in stream if s.stage == "content")
    assert content == BEFORE_PHRASE, content
    assert stream[p_i].message.startswith("stop on content by rule no-launch-codes"), stream[p_i]
    assert not [s for s in stages[p_i:] if s in CONTENT_STAGES], stages[p_i:]
    assert stages[-1] == "failure", stages
