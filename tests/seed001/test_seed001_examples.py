"""The examples of seed 001 (the Lybic GUI Agent REST/SSE manual) run against the
dispatcher's HTTP API, as the seed writes them: its curl lines through bash and the
real curl, its Python streaming client (Example 5) and its production client class,
copied verbatim (tests/seed001/*.py). Real processes: dispatcher, commanders, the
scripted model server, and for the sandbox examples the local sandbox server
(Xvfb + xdotool) driven through the unmodified lybic SDK.

Only the host is changed ("http://localhost:5000" -> the dispatcher). Where a test
departs from the seed's text it says "seed:" and why. Each example ends as the seed
says a task ends: "finished", "error" or "cancelled".
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from tests._procs import wait_until
from tests.conftest import Stack
from tests.seed001 import curl_examples as seed
from tests.seed001._stack import gui_commander, http_base, local_sandbox, sandboxes

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
SEED_HOST = "http://localhost:5000"

REASONING = "The user wants a calculation."
ANSWER = "Calculation completed: 56088"

# The production client's credentials (seed: "sk-your-lybic-api-key" /
# "your-lybic-org-id"), which its sandbox server accepts here.
PROD_KEY, PROD_ORG = "sk-your-lybic-api-key", "your-lybic-org-id"
# The curl examples' credentials.
CURL_KEY, CURL_ORG = "sk-lybic-key", "org-123"

GUI_TRAJECTORY = [
    {
        "content": "Thought: The browser is not open; I click the desktop to focus it.\n"
        "Action: click(point='<point>500 400</point>')"
    },
    {
        "content": "Thought: Done.\n"
        "Action: finished(content='Navigated to github.com in the sandbox.')"
    },
]


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    """The chat stack: the scripted model behind one commander, a slow one behind
    another dispatcher (for cancel and timeout), and a local sandbox server for the
    production client's sandbox."""
    if shutil.which("curl") is None or shutil.which("jq") is None:
        pytest.fail("curl and jq are needed: the seed's examples use them")
    llm = module_stack.scripted([{"reasoning": REASONING, "content": ANSWER}], tokens_per_sec=200)
    slow = module_stack.scripted(tokens_per_sec=20, tokens=2000)
    prod_sandbox = local_sandbox(module_stack, PROD_KEY)
    d = module_stack.dispatcher(
        "--http-listen",
        "127.0.0.1:0",
        "--sandbox-endpoint",
        prod_sandbox,
        "--sandbox-shape",
        "local-1024x768",
    )
    module_stack.commander(d, llm.base_url, slots=2, wait_slots=2)
    ds = module_stack.dispatcher("--http-listen", "127.0.0.1:0")
    module_stack.commander(ds, slow.base_url, slots=1, wait_slots=1)
    return SimpleNamespace(
        llm=llm,
        slow=slow,
        d=d,
        base=http_base(d),
        slow_base=http_base(ds),
        prod_sandbox=prod_sandbox,
    )


@pytest.fixture(scope="module")
def gui(module_stack: Stack) -> SimpleNamespace:
    """The GUI stack of Example 3: a dispatcher whose tasks run the gui planner
    (--default-planner gui, the seed's tasks name no planner) and whose
    /api/sandbox/create is the local sandbox server, a commander whose computer.*
    tools drive that server, and the scripted UI-TARS model."""
    gui_llm = module_stack.scripted(GUI_TRAJECTORY, tokens_per_sec=0)
    url = local_sandbox(module_stack, CURL_KEY)
    d = module_stack.dispatcher(
        "--http-listen",
        "127.0.0.1:0",
        "--default-planner",
        "gui",
        "--sandbox-endpoint",
        url,
        "--sandbox-shape",
        "local-1024x768",
    )
    gui_commander(module_stack, d, gui_llm, sandbox_url=url, api_key=CURL_KEY, org=CURL_ORG)
    return SimpleNamespace(d=d, base=http_base(d), sandbox=url, llm=gui_llm)


# ------------------------------------------------------------------ helpers


def bash(script: str, base: str, timeout: float = 120) -> str:
    """Runs a seed shell block with bash (real curl, real jq), host changed."""
    res = subprocess.run(
        ["bash", "-c", script.replace(SEED_HOST, base)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def sse_data(out: str) -> list[dict[str, Any]]:
    """The data events of an SSE stream, decoded (as the seed's clients read it)."""
    events = []
    for line in out.splitlines():
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events


def json_objects(out: str) -> list[dict[str, Any]]:
    """The JSON objects curl printed one after another."""
    dec = json.JSONDecoder()
    objs, i = [], 0
    text = out.strip()
    while i < len(text):
        obj, i = dec.raw_decode(text, i)
        objs.append(obj)
        while i < len(text) and text[i].isspace():
            i += 1
    return objs


def status(base: str, task_id: str) -> dict[str, Any]:
    r = requests.get(f"{base}/api/agent/task/status/{task_id}", timeout=10)
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def wait_seed_status(base: str, task_id: str, timeout: float = 60) -> dict[str, Any]:
    """Polls as the seed's loops do until finished / error / cancelled."""
    return wait_until(
        lambda: (s := status(base, task_id))["status"] in ("finished", "error", "cancelled") and s,
        timeout,
        f"task {task_id} ended",
        interval=0.1,
    )


def run_seed_source(name: str, base: str, call_main: bool = False) -> str:
    """Executes a verbatim seed client file with the host changed; returns what it
    printed. call_main: also run its main() (its `__name__ == "__main__"` guard)."""
    source = (HERE / name).read_text().replace(SEED_HOST, base)
    out = io.StringIO()
    ns: dict[str, Any] = {"__name__": f"seed001_{name}"}
    with contextlib.redirect_stdout(out):
        exec(compile(source, str(HERE / name), "exec"), ns)
        if call_main:
            ns["main"]()
    return out.getvalue()


def unique(text: str) -> str:
    return f"{text} [{uuid.uuid4().hex[:8]}]"


# ------------------------------------------------------------------ curl examples


def test_verify_installation(env: SimpleNamespace) -> None:
    out = bash(seed.VERIFY_INSTALLATION, env.base)
    assert json_objects(out) == [{"status": "ok"}]


def test_example1_streams_and_ends_finished(env: SimpleNamespace) -> None:
    out = bash(seed.EXAMPLE1, env.base)
    events = sse_data(out)
    assert events and all("type" in e for e in events), out
    assert "event:" not in out, "an SSE event the seed's clients do not expect"
    types = [e["type"] for e in events]
    assert types[-1] == "finished", types
    assert events[-1]["output"] == ANSWER
    assert "thinking" in types and "message" in types, types
    assert "".join(e["content"] for e in events if e["type"] == "thinking") == REASONING
    # The streaming mode example of the usage guide, the same way.
    events = sse_data(bash(seed.STREAMING_MODE, env.base))
    assert events[-1]["type"] == "finished" and events[-1]["output"] == ANSWER


def test_example2_submit_and_poll_until_finished(env: SimpleNamespace) -> None:
    (sub,) = json_objects(bash(seed.EXAMPLE2_SUBMIT, env.base))
    assert sub["success"] is True and sub["message"] == "Task submitted successfully", sub
    # seed: the poll line names the manual's example id; as written it is a JSON 404.
    (missing,) = json_objects(bash(seed.EXAMPLE2_POLL, env.base))
    assert missing["code"] == "NOT_FOUND", missing
    poll = seed.EXAMPLE2_POLL.replace("550e8400-e29b-41d4-a716-446655440000", sub["task_id"])
    final = wait_until(
        lambda: (s := json_objects(bash(poll, env.base))[0])["status"] == "finished" and s,
        60,
        "Example 2's task finished",
        interval=0.2,
    )
    assert final["query"] == ("Create a text file named report.txt with content: Meeting notes"), (
        final
    )
    assert final["finished_output"] == ANSWER
    assert final["sandbox_info"] == {"sandbox_id": "box-abc123"}
    messages = final["llm_context"]["messages"]
    assert messages[0]["role"] == "user" and messages[0]["content"] == final["query"]
    assert messages[-1] == {"role": "assistant", "content": ANSWER}
    # The async-mode block of the usage guide: submit (jq), then its poll line.
    out = bash(seed.ASYNC_MODE + "\necho\necho TASK_ID=$TASK_ID\n", env.base)
    task_id = out.rsplit("TASK_ID=", 1)[1].strip()
    assert wait_seed_status(env.base, task_id)["status"] == "finished"


def test_example3_sandbox_on_the_local_server_and_a_task_in_it(gui: SimpleNamespace) -> None:
    before = {s["id"] for s in sandboxes(gui.sandbox, CURL_KEY, CURL_ORG)}
    # seed: step 2 single-quotes "$SANDBOX_ID", so bash sends the literal text, not
    # the id; that run is below. Here the id is spliced in ('"$SANDBOX_ID"').
    splice = '"sandbox_id": "\'"$SANDBOX_ID"\'"'
    fixed = seed.EXAMPLE3.replace('"sandbox_id": "$SANDBOX_ID"', splice)
    assert fixed != seed.EXAMPLE3
    out = bash(fixed + '\necho "SANDBOX_ID=$SANDBOX_ID"\n', gui.base, timeout=180)
    sandbox_id = out.rsplit("SANDBOX_ID=", 1)[1].strip()
    assert sandbox_id.startswith("SBX-"), out
    events = sse_data(out)
    types = [e["type"] for e in events]
    assert types and types[-1] == "finished", out
    assert events[-1]["output"] == "Navigated to github.com in the sandbox."
    # The planner acted in the sandbox the seed created: its click went to the
    # local server, and no other sandbox was made for the task.
    actions = [e["content"] for e in events if e["type"] == "action"]
    assert any(a.startswith("computer.click(") for a in actions), types
    assert all(sandbox_id in a for a in actions if "sandbox_id" in a), actions
    task_id = events[-1]["task_id"]
    st = status(gui.base, task_id)
    assert st["status"] == "finished"
    assert st["sandbox_info"] == {"sandbox_id": sandbox_id}
    after = sandboxes(gui.sandbox, CURL_KEY, CURL_ORG)
    new = [s for s in after if s["id"] not in before]
    assert [s["id"] for s in new] == [sandbox_id], after
    assert new[0]["name"] == "automation-env"

    # As written: the task names the sandbox "$SANDBOX_ID", which does not exist.
    # It ends "error" with the reason, not "finished".
    out = bash(seed.EXAMPLE3, gui.base, timeout=180)
    events = sse_data(out)
    assert events and events[-1]["type"] == "error", out
    assert events[-1]["status"] == "error"
    st = status(gui.base, events[-1]["task_id"])
    assert st["status"] == "error" and st["error_message"], st
    assert "sandbox '$SANDBOX_ID' not found" in st["error_message"], st


def test_creating_sandboxes_block_and_limits(gui: SimpleNamespace) -> None:
    # seed: the usage guide's block uses the key "sk-your-key", which this local
    # server does not accept: the sandbox API's refusal is told (401).
    (refused,) = json_objects(bash(seed.CREATING_SANDBOXES, gui.base))
    assert refused["success"] is False and refused["code"] == "UNAUTHORIZED", refused
    out = bash(seed.CREATING_SANDBOXES.replace("sk-your-key", CURL_KEY), gui.base)
    (made,) = json_objects(out)
    assert made["success"] is True and made["sandbox_id"].startswith("SBX-"), made
    assert made["shape"] == "local-1024x768" and "beijing-2c-4g-cpu" in made["message"]
    # maxLifeSeconds is at most 86400 (seed: CreateSandboxRequest).
    over = seed.CREATING_SANDBOXES.replace("sk-your-key", CURL_KEY).replace("3600", "86401")
    (err,) = json_objects(bash(over, gui.base))
    assert err["code"] == "INVALID_ARGUMENT" and "86400" in err["error"], err


def test_example4_context_continuation(env: SimpleNamespace) -> None:
    # seed: `sleep 10` waits for the first task; here a poll waits for it instead,
    # and "$TASK_ID" is spliced in (the seed single-quotes it: bash would send the
    # literal text; that run is checked after).
    script = seed.EXAMPLE4.replace(
        "sleep 10",
        "for _ in $(seq 1 300); do curl -s http://localhost:5000/api/agent/task/status/$TASK_ID"
        " | jq -e '.status == \"finished\"' >/dev/null && break; sleep 0.1; done",
    ).replace('"task_id": "$TASK_ID"', '"task_id": "\'"$TASK_ID"\'"')
    out = bash(script + '\necho\necho "TASK_ID=$TASK_ID"\n', env.base)
    first = out.rsplit("TASK_ID=", 1)[1].strip()
    events = sse_data(out)
    assert events and events[-1]["type"] == "finished", out
    second = events[-1]["task_id"]
    st = status(env.base, second)
    messages = st["llm_context"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"], messages
    assert messages[0]["content"] == "Open notepad"
    assert messages[1]["content"] == status(env.base, first)["finished_output"]
    assert messages[2]["content"] == 'Type "Hello, World!" in the notepad'
    # As written: "$TASK_ID" is no task; the answer says so (404, as for
    # another tenant's task), no stream.
    objs = json_objects(bash(seed.EXAMPLE4.replace("sleep 10", "true"), env.base))
    assert objs[-1]["code"] == "NOT_FOUND" and "previous task" in objs[-1]["error"], objs


def test_cancelling_tasks_block(env: SimpleNamespace) -> None:
    # As written, "authentication": {...} is not JSON: 400 with the reason.
    objs = json_objects(bash(seed.CANCELLING_TASKS, env.base))
    assert [o["code"] for o in objs] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"], objs
    # seed: with {} for {...}: the unknown task is a 404, cancel-all succeeds.
    objs = json_objects(bash(seed.CANCELLING_TASKS.replace("{...}", "{}"), env.slow_base))
    assert objs[0]["code"] == "NOT_FOUND" and objs[1]["success"] is True, objs


# ------------------------------------------------------------------ Python clients


def test_example5_python_client(env: SimpleNamespace) -> None:
    printed = run_seed_source("example5_client.py", env.base)
    lines = printed.splitlines()
    # The stream prints one dict per event, then the status of the submitted task.
    events = [eval(line) for line in lines[:-1]]  # the repr of dicts the client yields
    assert events and all(isinstance(e, dict) and "type" in e for e in events), printed
    assert {} not in events
    assert events[-1]["type"] == "finished" and events[-1]["output"] == ANSWER, events[-1]
    last = eval(lines[-1])
    assert last["query"] == "Create file test.txt" and last["status"] in (
        "pending",
        "running",
        "finished",
    ), last
    assert wait_seed_status(env.base, last["task_id"])["status"] == "finished"


def test_production_client_main(env: SimpleNamespace) -> None:
    """The production client's main(): creates a sandbox (the local server), streams
    a task in it, submits a follow-up and polls until finished."""
    before = {s["id"] for s in sandboxes(env.prod_sandbox, PROD_KEY, PROD_ORG)}
    printed = run_seed_source("production_client.py", env.base, call_main=True)
    assert "Sandbox created: SBX-" in printed, printed
    assert f"Task completed: {ANSWER}" in printed, printed
    assert "Status: finished" in printed and "All tasks completed!" in printed, printed
    assert "[unknown]" not in printed and "Task completed: None" not in printed, printed
    after = sandboxes(env.prod_sandbox, PROD_KEY, PROD_ORG)
    assert len([s for s in after if s["id"] not in before]) == 1, after


def _prod_client(base: str) -> Any:
    ns: dict[str, Any] = {"__name__": "seed001_production_client"}
    source = (HERE / "production_client.py").read_text().replace(SEED_HOST, base)
    exec(compile(source, "production_client.py", "exec"), ns)
    return ns["ProductionLybicClient"](
        base_url=base, lybic_api_key=PROD_KEY, lybic_org_id=PROD_ORG, ark_api_key="ark"
    )


def _seed_poll(client: Any, task_id: str, deadline: float = 60) -> dict[str, Any]:
    """Step 4 of the production main(): poll until finished / error / cancelled
    (seed: time.sleep(2) between polls; 0.1 s here, bounded by a deadline)."""
    end = time.monotonic() + deadline
    while True:
        st: dict[str, Any] = client.get_task_status(task_id)
        if st["status"] in ["finished", "error", "cancelled"]:
            return st
        assert time.monotonic() < end, f"the seed's poll loop never ended: {st}"
        time.sleep(0.1)


def test_production_client_error_ends_the_poll_loop(env: SimpleNamespace) -> None:
    """A task that fails is "error" (seed 001's name), so the seed's loop ends."""
    client = _prod_client(env.slow_base)
    # timeout_seconds is the dispatcher's own field: the slow model cannot finish
    # in 1 s, so the task fails with the reason.
    r = requests.post(
        f"{env.slow_base}/api/agent/task/submit",
        json={"instruction": unique("Write a long essay"), "timeout_seconds": 1},
        timeout=10,
    )
    r.raise_for_status()
    st = _seed_poll(client, r.json()["task_id"])
    assert st["status"] == "error", st
    assert st["error_message"] and st["message"] == st["error_message"], st


def test_production_client_stream_cancelled(env: SimpleNamespace) -> None:
    """Cancelled mid-stream: the seed's stream loop ends on a "cancelled" event
    (never "finished" with no output) and its poll loop on "cancelled"."""
    client = _prod_client(env.slow_base)
    instruction = unique("Write a very long essay")
    events: list[dict[str, Any]] = []

    def stream() -> None:
        for event in client.run_task_stream(instruction, "box-123"):
            events.append(event)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    env.slow.wait_streams(
        instruction, lambda r: any(x["tokens"] > 0 for x in r), 30, "tokens streamed"
    )
    task_id = wait_until(
        lambda: next((e["task_id"] for e in list(events) if "task_id" in e), None),
        30,
        "an event with the task id",
    )
    resp = client.cancel_task(task_id)
    assert resp["success"] is True, resp
    t.join(30)
    assert not t.is_alive(), "the stream did not end after the cancel"
    assert events[-1]["type"] == "cancelled", events[-3:]
    assert all(e["type"] != "finished" for e in events), events
    assert _seed_poll(client, task_id)["status"] == "cancelled"
