"""Seed 003's byclaw workers serve our tasks through the bridge (commander/byclaw).

Real processes only: the dispatcher binary, Debian's redis-server
(scripts/redis.sh), the seed's own workers run by byclaw-gateway-sdk 0.1.1 from
PyPI in .venv-byclaw (Python 3.12+, scripts/byclaw_venv.sh) and unmodified
(tests/byclaw_seed_*.py are copied verbatim from the seed), and the bridge
(`python -m commander.byclaw`). Tasks go in through the seed-000 gRPC API
(lybic.agent.Agent), as its clients send them.

What the seed's quick-start `MyAssistant` does under SDK 0.1.1: it streams
"正在处理您的请求...\\n", waits 0.5 s, emits the state "thinking", then reads
`command.data`, which AskAgentCommand does not have: the SDK ends the task
`FAILED: 'AskAgentCommand' object has no attribute 'data'`. So a stop in the
0.5 s after its first chunk is a stop mid-stream, and a run to its end is a
failure, reported as such. The seed's streaming example (`StreamingAgent`)
succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import redis

from commander._gen.dispatch.v1 import tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, wait_status, watch_all
from tests._procs import PYTHON, ROOT, Proc, spawn, wait_until
from tests.conftest import Dispatcher, Stack

pytestmark = pytest.mark.e2e

FIRST_CHUNK = "正在处理您的请求...\n"
SEED_BUG = "'AskAgentCommand' object has no attribute 'data'"
STREAMING_TEXT = "这是一段流式输出的示例文本。"
REPORT_URL = (
    "https://files.example.invalid/report.pdf"  # tests/byclaw_workers.py (SDK-only imports)
)

# The bridge's defaults (ByclawSettings): a lost worker is reported within
# worker_timeout + 2 x probe_interval (docs/operations.md).
WORKER_TIMEOUT = 10.0
PROBE_INTERVAL = 1.0
LOST_WINDOW = WORKER_TIMEOUT + 2 * PROBE_INTERVAL


# ------------------------------------------------------------------ processes


@pytest.fixture(scope="module")
def byclaw_python() -> Path:
    """.venv-byclaw (idempotent; `make setup-byclaw` made it already under make)."""
    subprocess.run([str(ROOT / "scripts" / "byclaw_venv.sh")], check=True, timeout=600)
    return ROOT / ".venv-byclaw" / "bin" / "python"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server (scripts/redis.sh) for this module."""
    env = {**os.environ, "REDIS_STATE_DIR": str(tmp_path_factory.mktemp("redis") / "state")}
    script = str(ROOT / "scripts" / "redis.sh")
    url = subprocess.run(
        [script, "start"], env=env, check=True, capture_output=True, text=True, timeout=300
    ).stdout.strip()
    try:
        yield url
    finally:
        subprocess.run([script, "stop"], env=env, check=False, timeout=60)


def with_db(url: str, db: int) -> str:
    u = urlparse(url)
    return f"redis://{u.hostname}:{u.port}/{db}"


def start_worker(
    stack: Stack, python: Path, url: str, worker_class: str, worker_id: str
) -> tuple[Proc, redis.Redis]:
    """Runs a seed worker the way the seed deploys one (`python -m byclaw_gateway_sdk
    --worker-class ...`), in its own directory (the SDK writes gateway-sdk.log to
    the working directory); waits until it registered."""
    u = urlparse(url)
    db = int(u.path.strip("/") or 0)
    workdir = stack.workdir / worker_id
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        shutil.which("env") or "/usr/bin/env",  # the launcher execs a path
        "-C",
        str(workdir),
        str(python),
        "-m",
        "byclaw_gateway_sdk",
        "--worker-class",
        worker_class,
        "--worker-id",
        worker_id,
        "--redis-host",
        str(u.hostname),
        "--redis-port",
        str(u.port),
        "--redis-db",
        str(db),
        "--workspace",
        str(workdir / "workspace"),
    ]
    proc = spawn(worker_id, argv, stack.workdir, env={"PYTHONPATH": str(ROOT)})
    stack.procs.append(proc)
    r = redis.Redis.from_url(url, decode_responses=True)
    wait_until(
        lambda: (
            r.exists(f"byai_gateway:registry:worker:lock:{worker_id}")
            and r.zscore("byai_gateway:registry:active_workers", worker_id) is not None
        ),
        30,
        f"byclaw worker {worker_id} registered",
        interval=0.1,
        procs=[proc],
    )
    return proc, r


def start_bridge(stack: Stack, d: Dispatcher, url: str, name: str, *flags: str) -> Proc:
    argv = [
        PYTHON,
        "-m",
        "commander.byclaw",
        "--redis",
        url,
        "--dispatcher",
        d.addr,
        "--slots",
        "2",
        "--id",
        name,
        "--log-level",
        "debug",
        *flags,
    ]
    proc = spawn(name, argv, stack.workdir)
    stack.procs.append(proc)
    d.wait_slots(2, timeout=30, procs=[proc])
    return proc


@pytest.fixture(scope="module")
def env(module_stack: Stack, byclaw_python: Path, redis_url: str) -> SimpleNamespace:
    url = with_db(redis_url, 0)
    assistant, r = start_worker(
        module_stack, byclaw_python, url, "tests.byclaw_seed_my_agent.MyAssistant", "w-assistant"
    )
    streaming, _ = start_worker(
        module_stack, byclaw_python, url, "tests.byclaw_seed_streaming.StreamingAgent", "w-stream"
    )
    every, _ = start_worker(
        module_stack, byclaw_python, url, "tests.byclaw_workers.EveryKind", "w-every"
    )
    # Seed-000 clients name no planner: the deployment's default is the worker's.
    d = module_stack.dispatcher("--default-planner", "weather_agent")
    bridge = start_bridge(module_stack, d, url, "byclaw-bridge")
    return SimpleNamespace(
        d=d, r=r, bridge=bridge, assistant=assistant, streaming=streaming, every=every
    )


# ------------------------------------------------------------------ helpers


def session_of(task_id: str) -> str:
    return f"agentdispatch-{task_id}"


def execution(r: redis.Redis, task_id: str) -> dict[str, object] | None:
    """The SDK's own record of the task's execution (written by the worker)."""
    reg = f"byai_gateway:session:{session_of(task_id)}:registry"
    exec_id = r.hget(reg, f"msg_map:msg-{task_id}")
    raw = r.hget(reg, f"exec:{exec_id}") if exec_id else None
    return json.loads(str(raw)) if raw else None


def worker_output(r: redis.Redis, task_id: str) -> list[tuple[str, str]]:
    """(contentType, content) of everything the worker emitted for the task."""
    out = []
    stream = f"byai_gateway:session:{session_of(task_id)}:data_stream"
    for _id, fields in r.xrange(stream):
        try:
            msg = json.loads(fields["data"])
            out.append((msg["data"]["contentType"], msg["data"]["choices"][0]["delta"]["content"]))
        except (KeyError, ValueError, TypeError):
            continue  # the malformed entries a test injected
    return out


def stream_task(
    d: Dispatcher, instruction: str, *, on_first_content: object = None
) -> tuple[str, list[agent_pb2.TaskStream]]:
    """Seed 000's async lifecycle: RunAgentInstructionAsync, then GetAgentTaskStream
    to the end; `on_first_content(task_id)` runs when the first content arrives."""
    task_id = d.agent.RunAgentInstructionAsync(
        agent_pb2.RunAgentInstructionRequest(instruction=instruction), timeout=5
    ).taskId
    seen: list[agent_pb2.TaskStream] = []
    fired = False
    req = agent_pb2.GetAgentTaskStreamRequest(taskId=task_id)
    for ev in d.agent.GetAgentTaskStream(req, timeout=60):
        seen.append(ev.taskStream)
        if ev.taskStream.stage == "content" and not fired and callable(on_first_content):
            fired = True
            on_first_content(task_id)
    return task_id, seen


def stages(seen: list[agent_pb2.TaskStream]) -> list[str]:
    return [ts.stage for ts in seen]


# ------------------------------------------------------------------ tests


def test_my_assistant_streams_and_is_stopped_mid_stream(env: SimpleNamespace) -> None:
    d, r = env.d, env.r
    stopped_at: list[float] = []

    def stop(task_id: str) -> None:
        stopped_at.append(time.monotonic())
        resp = d.agent.CancelTask(agent_pb2.CancelTaskRequest(taskId=task_id), timeout=10)
        assert resp.success, resp

    task_id, seen = stream_task(d, "今天北京天气怎么样?", on_first_content=stop)
    status = wait_status(d.agent, task_id)
    assert status.status == agent_pb2.CANCELLED, status

    names = stages(seen)
    assert names[-1] == "cancelled", names
    contents = [ts.message for ts in seen if ts.stage == "content"]
    assert contents == [FIRST_CHUNK], names
    # Nothing of the worker's after the stop.
    after = names[names.index("stop") :]
    assert not {"content", "worker_state", "final", "failure"} & set(after), names

    # The worker itself was cancelled (the SDK's CANCEL_TASK reached it): its
    # record says CANCELLED and it emitted nothing after its first chunk.
    rec = wait_until(
        lambda: (e := execution(r, task_id)) and e["status"] == "CANCELLED" and e,
        10,
        "the worker's execution record says CANCELLED",
        procs=[env.assistant, env.bridge],
    )
    assert rec["worker_id"] == "w-assistant"
    out = worker_output(r, task_id)
    chunks = [c for t, c in out if t == "1002"]
    assert chunks == [FIRST_CHUNK], out
    assert ("3003", "CANCELLED") in out and ("3003", "thinking") not in out, out


def test_my_assistant_run_to_its_end_fails_truthfully(env: SimpleNamespace) -> None:
    """Unstopped, the seed's quick-start worker fails (command.data): FAILURE with its reason."""
    task_id, seen = stream_task(env.d, "今天北京天气怎么样?")
    status = wait_status(env.d.agent, task_id)
    assert status.status == agent_pb2.FAILURE, status
    assert SEED_BUG in status.message, status.message
    assert "w-assistant" in status.message, status.message
    names = stages(seen)
    assert names[-1] == "failure" and SEED_BUG in seen[-1].message, names
    assert [ts.message for ts in seen if ts.stage == "content"] == [FIRST_CHUNK]
    assert any(ts.stage == "worker_state" and ts.message == "thinking" for ts in seen), names


def test_streaming_example_succeeds_token_by_token(env: SimpleNamespace) -> None:
    """The seed's streaming example, a chunk per character, ends SUCCESS with its text."""
    req = tasks_pb2.SubmitTaskRequest(instruction="stream something", planner="streaming_demo")
    task_id = env.d.tasks.SubmitTask(req, timeout=5).task_id
    stream = env.d.agent.GetAgentTaskStream(
        agent_pb2.GetAgentTaskStreamRequest(taskId=task_id), timeout=60
    )
    seen = [ev.taskStream for ev in stream]
    status = wait_status(env.d.agent, task_id)
    assert status.status == agent_pb2.SUCCESS, status
    assert status.result == STREAMING_TEXT
    contents = [ts.message for ts in seen if ts.stage == "content"]
    assert contents == list(STREAMING_TEXT), contents
    assert stages(seen)[-1] == "final"


def test_every_output_kind_becomes_our_event(env: SimpleNamespace) -> None:
    """emit_chunk → content, emit_state → stage, emit_artifact → artifact, a reasoning
    chunk → thought; the SDK's COMPLETED → SUCCESS with the streamed text."""
    req = tasks_pb2.SubmitTaskRequest(instruction="hello", planner="every_kind")
    task_id = env.d.tasks.SubmitTask(req, timeout=5).task_id
    events = watch_all(env.d.tasks, task_id)
    out = [
        (kind(ev), ev.content.text or ev.stage.message or ev.artifact.uri or ev.thought.delta)
        for ev in events
        if kind(ev) in ("content", "stage", "artifact", "thought")
    ]
    assert out == [
        ("content", "part one, "),
        ("stage", "working"),
        ("artifact", REPORT_URL),
        ("thought", "weighing the options"),
        ("content", "part two: hello"),
    ], describe(events)
    assert events[-1].state.status == agent_pb2.SUCCESS, describe(events)
    status = wait_status(env.d.agent, task_id)
    assert status.result == "part one, part two: hello"


def test_malformed_data_entry_is_acked_and_skipped(env: SimpleNamespace) -> None:
    """Garbage on a task's data stream: logged, acked (never redelivered), the task unharmed."""
    r = env.r
    req = tasks_pb2.SubmitTaskRequest(instruction="stream again", planner="streaming_demo")
    task_id = env.d.tasks.SubmitTask(req, timeout=5).task_id
    stream = f"byai_gateway:session:{session_of(task_id)}:data_stream"
    bad = [
        r.xadd(stream, {"data": "{not json"}),
        r.xadd(stream, {"other": "field"}),
        r.xadd(stream, {"data": json.dumps({"event_type": "answerDelta"})}),
    ]
    status = wait_status(env.d.agent, task_id)
    assert status.status == agent_pb2.SUCCESS, status
    assert status.result == STREAMING_TEXT
    # All read and acked by the bridge's group: nothing pending, nothing to redeliver.
    summary = r.xpending(stream, "agentdispatch_bridge")
    assert summary["pending"] == 0, summary
    log = env.bridge.log_text()
    for entry_id in bad:
        assert f"malformed entry {entry_id}" in log, entry_id


def test_malformed_control_entries_are_acked_not_left_pending(env: SimpleNamespace) -> None:
    """The SDK's worker logs an entry it cannot parse and never acks it; the bridge's
    janitor acks it. The worker keeps serving."""
    r = env.r
    ctrl = "byai_gateway:ctrl:capability:weather_agent"
    bad = [
        str(r.xadd(ctrl, {"data": "{not json"})),
        str(r.xadd(ctrl, {"data": json.dumps({"action_type": "NOPE", "header": {}})})),
        str(r.xadd(ctrl, {"nodata": "x"})),
    ]

    def settled() -> bool:
        groups = {g["name"]: g for g in r.xinfo_groups(ctrl)}
        last = str(groups["agent_engines"]["last-delivered-id"])
        delivered = tuple(map(int, last.split("-"))) >= tuple(map(int, bad[-1].split("-")))
        pending = {p["message_id"] for p in r.xpending_range(ctrl, "agent_engines", "-", "+", 100)}
        return delivered and not pending & set(bad)

    wait_until(settled, 20, "malformed control entries delivered and acked", procs=[env.bridge])
    log = env.bridge.log_text()
    for entry_id in bad:
        assert f"malformed entry {entry_id} on {ctrl}" in log, entry_id
    # The worker logged each once (no redelivery) and still serves a task.
    task_id, seen = stream_task(env.d, "还在吗?")
    assert [ts.message for ts in seen if ts.stage == "content"] == [FIRST_CHUNK]
    assert wait_status(env.d.agent, task_id).status == agent_pb2.FAILURE  # the seed's bug


def test_worker_killed_mid_task_ends_failure_within_window(
    stack: Stack, byclaw_python: Path, redis_url: str
) -> None:
    """kill -9 of the worker while it runs a task: FAILURE with the reason, within
    worker_timeout + 2 probe intervals (12 s with the defaults used here)."""
    url = with_db(redis_url, 1)  # its own database: the module's workers never see it
    doomed, r = start_worker(
        stack, byclaw_python, url, "tests.byclaw_seed_my_agent.MyAssistant", "w-doomed"
    )
    d = stack.dispatcher("--default-planner", "weather_agent")
    bridge = start_bridge(stack, d, url, "byclaw-bridge-kill")
    killed_at: list[float] = []

    def kill(_task_id: str) -> None:
        doomed.kill9()
        killed_at.append(time.monotonic())

    task_id, seen = stream_task(d, "今天北京天气怎么样?", on_first_content=kill)
    ended_at = time.monotonic()
    status = wait_status(d.agent, task_id)
    assert status.status == agent_pb2.FAILURE, status
    assert "w-doomed stopped answering" in status.message, status.message
    assert killed_at and ended_at - killed_at[0] <= LOST_WINDOW + 2.0, ended_at - killed_at[0]
    names = stages(seen)
    assert names[-1] == "failure", names
    assert [ts.message for ts in seen if ts.stage == "content"] == [FIRST_CHUNK]
    # Nothing left behind to run the task again: the command is acked, the SDK's
    # record says FAILED.
    ctrl = "byai_gateway:ctrl:capability:weather_agent"
    assert r.xpending(ctrl, "agent_engines")["pending"] == 0
    rec = execution(r, task_id)
    assert rec is not None and rec["status"] == "FAILED", rec
    assert "lost" in bridge.log_text()


def test_task_no_worker_takes_ends_failure(
    stack: Stack, byclaw_python: Path, redis_url: str
) -> None:
    """A capability served by no live worker: FAILURE after --queue-timeout, the
    command withdrawn so that no later worker runs it."""
    url = with_db(redis_url, 2)
    d = stack.dispatcher("--default-planner", "ghost_agent")
    start_bridge(
        stack, d, url, "byclaw-bridge-ghost", "--capability", "ghost_agent", "--queue-timeout", "3"
    )
    t0 = time.monotonic()
    task_id, _seen = stream_task(d, "anyone there?")
    status = wait_status(d.agent, task_id)
    assert status.status == agent_pb2.FAILURE, status
    assert "no byclaw worker with capability 'ghost_agent' took the task within 3 s" in (
        status.message
    ), status.message
    assert time.monotonic() - t0 < 12
    r = redis.Redis.from_url(url, decode_responses=True)
    ctrl = "byai_gateway:ctrl:capability:ghost_agent"
    assert r.xlen(ctrl) == 0

    # Stopped while still queued on Redis: CANCELLED, and the command withdrawn
    # (a worker that comes later must not run a cancelled task).
    task_id = d.agent.RunAgentInstructionAsync(
        agent_pb2.RunAgentInstructionRequest(instruction="anyone?"), timeout=5
    ).taskId
    wait_status(d.agent, task_id, statuses=[agent_pb2.RUNNING])
    wait_until(lambda: r.xlen(ctrl) == 1, 5, "the command is on the capability stream")
    assert d.agent.CancelTask(agent_pb2.CancelTaskRequest(taskId=task_id), timeout=10).success
    assert wait_status(d.agent, task_id).status == agent_pb2.CANCELLED
    wait_until(lambda: r.xlen(ctrl) == 0, 5, "the cancelled command withdrawn")


_SDK_VERDICTS = """
import asyncio, json, sys
from byclaw_gateway_sdk.worker._message_processing import parse_message_data
from byclaw_gateway_sdk.core.protocol.commands import command_from_dict

async def verdict(fields):
    try:
        command_from_dict(await parse_message_data(fields))
        return True
    except Exception:
        return False

cases = json.load(open(sys.argv[1]))
print(json.dumps([asyncio.run(verdict(f)) for f in cases]))
"""


def test_janitor_verdicts_agree_with_the_sdk(byclaw_python: Path, tmp_path: Path) -> None:
    """What the janitor calls malformed is exactly what the SDK's worker cannot parse."""
    from commander.byclaw import _protocol as proto

    header = {"message_id": "m", "session_id": "s", "trace_id": "t"}
    cases: list[dict[str, str]] = [
        proto.ask_agent_payload(
            capability="c", message_id="m", session_id="s", content="hi", extra_payload={}
        ),
        proto.cancel_task_payload(message_id="m", session_id="s", capability="c", worker_id="w"),
        proto.probe_payload("w"),
        {"nodata": "x"},
        {"data": "{not json"},
        {"data": "[]"},
        {"data": json.dumps({"action_type": "NOPE", "header": header})},
        {"data": json.dumps({"action_type": "ASK_AGENT", "header": {"message_id": "m"}})},
        {"data": json.dumps({"action_type": "ASK_AGENT", "header": header, "body": {}})},
        {
            "data": json.dumps(
                {"action_type": "ASK_AGENT", "header": header, "body": {"content": " "}}
            )
        },
        {
            "data": json.dumps(
                {"action_type": "ASK_AGENT", "header": header, "body": {"content": []}}
            )
        },
        {
            "data": json.dumps(
                {"action_type": "ASK_AGENT", "header": header, "body": {"content": [{"a": 1}]}}
            )
        },
        {"data": json.dumps({"action_type": "RESUME", "header": header, "body": {}})},
        {"data": json.dumps({"action_type": "RESUME", "header": header, "body": {"status": "OK"}})},
        {"data": json.dumps({"action_type": "CANCEL_TASK", "header": header, "body": {}})},
        {
            "data": json.dumps(
                {
                    "action_type": "CANCEL_TASK",
                    "header": header,
                    "body": {"target_message_id": "m", "cancel_mode": "brutal"},
                }
            )
        },
    ]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    out = subprocess.run(
        [str(byclaw_python), "-c", _SDK_VERDICTS, str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # the SDK writes gateway-sdk.log to the working directory
    ).stdout
    sdk_ok = json.loads(out.strip().splitlines()[-1])
    ours_ok = [proto.command_problem(f) is None for f in cases]
    assert ours_ok == sdk_ok, list(zip(cases, ours_ok, sdk_ok, strict=True))
    assert sdk_ok[:3] == [True, True, True] and not all(sdk_ok[3:])
