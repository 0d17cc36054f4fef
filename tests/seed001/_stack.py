"""Pieces of the seed-001 stack the shared conftest does not start: the
dispatcher's HTTP address, the local sandbox server, a commander running
the gui planner with the computer.* tools on that server."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

from tests import _procs
from tests._procs import PYTHON, Proc, spawn, wait_until
from tests.conftest import Dispatcher, Stack
from tests.scripted import ScriptedLLM

_HTTP_RE = re.compile(r'msg="http api serving".*?\baddr=(\S+)')


def http_base(d: Dispatcher) -> str:
    """http://HOST:PORT of a dispatcher started with --http-listen 127.0.0.1:0
    (from its log line "http api serving", written before it is ready)."""
    m = wait_until(
        lambda: _HTTP_RE.search(d.proc.log_text()), 10, "http api serving", procs=[d.proc]
    )
    return f"http://{m.group(1)}"


def local_sandbox(stack: Stack, api_key: str) -> str:
    """Starts `python -m localsandbox` accepting api_key (any org); returns its URL."""
    name = stack._name("localsandbox")
    addr_file = stack.workdir / f"{name}.addr"
    proc = spawn(
        name,
        [
            PYTHON,
            "-m",
            "localsandbox",
            "--listen",
            "127.0.0.1:0",
            "--addr-file",
            str(addr_file),
            "--state-dir",
            str(stack.workdir / f"{name}.state"),
        ],
        stack.workdir,
        {"LOCALSANDBOX_API_KEY": api_key},
    )
    stack.procs.append(proc)
    addr = wait_until(
        lambda: _procs.read_addr_file(addr_file), 30, "localsandbox wrote its address", procs=[proc]
    )
    return f"http://{addr}"


def sandboxes(url: str, api_key: str, org: str) -> list[dict[str, Any]]:
    """The sandboxes the local sandbox server holds for org."""
    req = urllib.request.Request(f"{url}/api/orgs/{org}/sandboxes", headers={"x-api-key": api_key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        out: list[dict[str, Any]] = json.loads(resp.read())
    return out


def gui_commander(
    stack: Stack,
    d: Dispatcher,
    gui_llm: ScriptedLLM,
    *,
    sandbox_url: str,
    api_key: str,
    org: str,
) -> Proc:
    """A commander whose gui planner drives the local sandbox server (computer.*
    tools in process, the unmodified lybic SDK); waits for its slot."""
    name = stack._name("gui-commander")
    argv = [
        PYTHON,
        "-m",
        "commander",
        "--dispatcher",
        d.addr,
        "--slots",
        "1",
        "--llm-base-url",
        gui_llm.base_url,
        "--llm-model",
        "scripted",
        "--llm-api-key",
        "sk-test-not-a-real-key",
        "--llm-allowed-endpoints",
        ",".join(llm.base_url for llm in stack.llms),
        "--gui-base-url",
        gui_llm.base_url,
        "--gui-model",
        "ui-tars-scripted",
        "--sandbox-endpoint",
        sandbox_url,
        "--sandbox-org",
        org,
        "--id",
        name,
        "--log-level",
        "debug",
    ]
    proc = spawn(name, argv, stack.workdir, {"LYBIC_API_KEY": api_key})
    stack.procs.append(proc)
    d.wait_slots(1, timeout=60, procs=[proc])
    wait_until(
        lambda: "computer.click" in d.tool_names(),
        30,
        "the computer.* tools registered",
        procs=[proc, d.proc],
    )
    return proc


def scripted_with_context(
    stack: Stack, script: list[dict[str, object]], context_tokens: int
) -> ScriptedLLM:
    """A scriptedllm with a context window (--context-tokens), answering a longer
    prompt as llama-cpp-python does (an empty 200 stream; 400 not streamed)."""
    name = stack._name("scriptedllm-ctx")
    script_file = stack.workdir / f"{name}.json"
    script_file.write_text(json.dumps(script))
    flags = ["--tokens-per-sec", "0", "--script", str(script_file)]
    flags += ["--context-tokens", str(context_tokens)]
    proc, addr, _ = stack._listener("scriptedllm", name, "127.0.0.1:0", flags)
    llm = ScriptedLLM(proc, addr)
    wait_until(llm.ready, 10, "scriptedllm answers GET /stats", procs=[proc])
    stack.llms.append(llm)
    return llm
