"""Fixtures for the cross-process tests: real binaries, real processes, loopback only.

A `Stack` owns every process it starts and kills them all at teardown (SIGTERM,
then SIGKILL of the process group), also when the test failed or timed out.
Ports are chosen by the OS (`--listen 127.0.0.1:0 --addr-file`). When a test
fails, the tails of the logs of every process still running are attached to
its report.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from commander._gen.dispatch.v1 import tasks_pb2, tasks_pb2_grpc
from commander._gen.lybic.agent import agent_pb2, agent_pb2_grpc
from tests import _procs
from tests._procs import PYTHON, Proc, spawn, wait_until
from tests.scripted import ScriptedLLM


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test in this directory is cross-process.
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        procs = _procs.live_procs()
        if procs:
            rep.sections.append(("process logs", _procs.logs_of(procs, lines=60)))


# ------------------------------------------------------------------ clients


class _AuthInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _with(self, details):  # type: ignore[no-untyped-def]
        md = [*(details.metadata or ()), self._md]
        return details._replace(metadata=md)

    def intercept_unary_unary(self, cont, details, request):  # type: ignore[no-untyped-def]
        return cont(self._with(details), request)

    def intercept_unary_stream(self, cont, details, request):  # type: ignore[no-untyped-def]
        return cont(self._with(details), request)

    def intercept_stream_unary(self, cont, details, it):  # type: ignore[no-untyped-def]
        return cont(self._with(details), it)

    def intercept_stream_stream(self, cont, details, it):  # type: ignore[no-untyped-def]
        return cont(self._with(details), it)


class Dispatcher:
    """A running dispatcher binary and sync gRPC stubs to it."""

    def __init__(
        self, stack: Stack, proc: Proc, addr: str, argv: list[str], client_token: str | None
    ):
        self.stack = stack
        self.proc = proc
        self.addr = addr
        self.argv = argv
        self.client_token = client_token
        self._channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            ch = grpc.insecure_channel(self.addr)
            if self.client_token:
                ch = grpc.intercept_channel(ch, _AuthInterceptor(self.client_token))
            self._channel = ch
        return self._channel

    @property
    def agent(self) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self.channel)

    @property
    def tasks(self) -> tasks_pb2_grpc.TaskServiceStub:
        return tasks_pb2_grpc.TaskServiceStub(self.channel)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def slots(self) -> int:
        info = self.agent.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), timeout=2)
        return int(info.maxConcurrentTasks)

    def wait_slots(self, n: int, timeout: float = 30.0, procs: list[Proc] | None = None) -> None:
        wait_until(
            lambda: self.slots() == n,
            timeout,
            f"GetAgentInfo.maxConcurrentTasks == {n}",
            interval=0.1,
            procs=[self.proc, *(procs or [])],
        )

    def submit(self, instruction: str, llm: ScriptedLLM | None = None, **labels: str) -> str:
        """Submits a task (to `llm`'s model, if given; with `labels`); returns its id."""
        req = tasks_pb2.SubmitTaskRequest(instruction=instruction, labels=labels)
        if llm is not None:
            req.running_config.CopyFrom(llm.model_config())
        return self.tasks.SubmitTask(req, timeout=5).task_id

    def tool_names(self) -> set[str]:
        resp = self.tasks.ListTools(tasks_pb2.ListToolsRequest(), timeout=2)
        return {t.name for t in resp.tools}


class Stack:
    """Starts processes for a test (or a module) and owns them until close()."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.dispatchers: list[Dispatcher] = []
        self.llms: list[ScriptedLLM] = []
        self._n = 0

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}-{self._n}"

    def _listener(
        self,
        binary: str,
        name: str,
        listen: str,
        flags: list[str],
        env: dict[str, str] | None = None,
    ) -> tuple[Proc, str, list[str]]:
        """Starts a Go binary that listens on `listen` and writes its address to
        `--addr-file`; returns the process, the address and the command line."""
        addr_file = self.workdir / f"{name}.addr"
        argv = [
            str(_procs.ensure_binary(binary)),
            "--listen",
            listen,
            "--addr-file",
            str(addr_file),
            *flags,
        ]
        proc = spawn(name, argv, self.workdir, env)
        self.procs.append(proc)
        addr = wait_until(
            lambda: _procs.read_addr_file(addr_file),
            20,
            f"{binary} wrote its address",
            procs=[proc],
        )
        return proc, addr, argv

    # -------------------------------------------------------------- scripted model

    def scripted(
        self,
        script: list[dict[str, object]] | None = None,
        *,
        tokens_per_sec: float = 0,
        tokens: int = 16,
        reasoning_tokens: int = 0,
    ) -> ScriptedLLM:
        """Starts a scriptedllm server replaying `script` (see tests/scripted.py)."""
        name = self._name("scriptedllm")
        flags = [
            "--tokens-per-sec",
            str(tokens_per_sec),
            "--tokens",
            str(tokens),
            "--reasoning-tokens",
            str(reasoning_tokens),
        ]
        if script is not None:
            script_file = self.workdir / f"{name}.json"
            script_file.write_text(json.dumps(script))
            flags += ["--script", str(script_file)]
        proc, addr, _ = self._listener("scriptedllm", name, "127.0.0.1:0", flags)
        llm = ScriptedLLM(proc, addr)
        wait_until(llm.ready, 10, "scriptedllm answers GET /stats", procs=[proc])
        self.llms.append(llm)
        return llm

    # -------------------------------------------------------------- dispatcher

    def dispatcher(
        self,
        *extra: str,
        listen: str = "127.0.0.1:0",
        client_token: str | None = None,
        commander_token: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Dispatcher:
        exe = _procs.ensure_binary("dispatcher")
        name = self._name("dispatcher")
        flags = ["--log-format", "text", *extra]
        if client_token:
            flags += ["--client-token", client_token]
        if commander_token:
            flags += ["--commander-token", commander_token]
        if _has_flag(str(exe), "--data-dir") and not {"--data-dir", "--storage-backend"} & set(
            extra
        ):
            # Each dispatcher its own embedded store (the default, ./.data, is
            # locked by one dispatcher and would outlive the test); a restart
            # reuses the flags, and so the store.
            flags += ["--data-dir", str(self.workdir / f"{name}.data")]
        proc, addr, argv = self._listener("dispatcher", name, listen, flags, env)
        wait_until(
            lambda: _procs.health_status(addr) == _procs.HEALTH_SERVING,
            20,
            f"dispatcher at {addr} health SERVING",
            interval=0.05,
            procs=[proc],
        )
        d = Dispatcher(self, proc, addr, argv, client_token)
        self.dispatchers.append(d)
        return d

    def restart_dispatcher(self, old: Dispatcher) -> Dispatcher:
        """Kills old (SIGKILL) and starts a new dispatcher on the same address and flags."""
        old.close_channel()
        old.proc.kill9()
        extra = old.argv[old.argv.index("--addr-file") + 2 :]
        # Token flags are part of extra already; keep them as they were.
        new = self.dispatcher(*extra, listen=old.addr)
        new.client_token = old.client_token
        return new

    # -------------------------------------------------------------- python processes

    def commander(
        self,
        dispatcher: Dispatcher | str,
        llm_base_url: str,
        *,
        slots: int = 2,
        model: str = "scripted",
        token: str | None = None,
        commander_id: str | None = None,
        wait_slots: int | None = None,
        env: dict[str, str] | None = None,
        allowed_endpoints: list[str] | None = None,
    ) -> Proc:
        """Starts `python -m commander`; waits until the dispatcher counts wait_slots.

        Tasks may name as their model endpoint (`ScriptedLLM.model_config`) any
        scripted server this stack started so far, or only `allowed_endpoints`.
        """
        addr = dispatcher if isinstance(dispatcher, str) else dispatcher.addr
        name = self._name("commander")
        argv = [
            PYTHON,
            "-m",
            "commander",
            "--dispatcher",
            addr,
            "--slots",
            str(slots),
            "--llm-base-url",
            llm_base_url,
            "--llm-model",
            model,
            "--llm-api-key",
            "sk-test-not-a-real-key",
            "--llm-allowed-endpoints",
            ",".join(
                allowed_endpoints
                if allowed_endpoints is not None
                else [llm.base_url for llm in self.llms]
            ),
            "--id",
            commander_id or name,
            "--log-level",
            "debug",
        ]
        if token:
            argv += ["--token", token]
        proc = spawn(name, argv, self.workdir, env)
        self.procs.append(proc)
        if wait_slots is not None and isinstance(dispatcher, Dispatcher):
            dispatcher.wait_slots(wait_slots, timeout=30, procs=[proc])
        return proc

    def provider(
        self,
        dispatcher: Dispatcher,
        workspace: Path,
        *,
        token: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Starts the separate tool provider process; waits until its tools are listed."""
        name = self._name("tools")
        workspace.mkdir(parents=True, exist_ok=True)
        argv = [
            PYTHON,
            "-m",
            "commander.tools_main",
            "--dispatcher",
            dispatcher.addr,
            "--root",
            str(workspace),
        ]
        if token:
            argv += ["--token", token]
        proc = spawn(name, argv, self.workdir, env)
        self.procs.append(proc)
        wait_until(
            lambda: "workspace.write_file" in dispatcher.tool_names(),
            30,
            "provider tools registered",
            interval=0.1,
            procs=[proc, dispatcher.proc],
        )
        return proc

    def hanging_provider(self, dispatcher: Dispatcher) -> Proc:
        """Starts tests/_hanging_provider.py (tools that never answer); waits for its tools."""
        return self.raw_provider(dispatcher, "tests._hanging_provider", "test.hang")

    def gui_provider(self, dispatcher: Dispatcher) -> Proc:
        """Starts tests/_gui_provider.py (computer.click and .type, answered at once)."""
        return self.raw_provider(dispatcher, "tests._gui_provider", "computer.click")

    def raw_provider(self, dispatcher: Dispatcher, module: str, tool: str) -> Proc:
        """Starts `python -m <module> ADDR`, a provider built on tests/_rawprovider.py that
        serves `tool`; waits until the dispatcher lists it and the provider was welcomed."""
        # A previous instance's tools must be gone first, or the name is taken.
        wait_until(
            lambda: tool not in dispatcher.tool_names(),
            10,
            f"earlier {tool} provider unregistered",
        )
        name = self._name(module.removeprefix("tests._").replace("_", "-"))
        proc = spawn(name, [PYTHON, "-m", module, dispatcher.addr], self.workdir)
        self.procs.append(proc)
        wait_until(
            lambda: tool in dispatcher.tool_names() and "WELCOME" in proc.log_text(),
            30,
            f"{module} registered",
            interval=0.1,
            procs=[proc, dispatcher.proc],
        )
        return proc

    # -------------------------------------------------------------- teardown

    def close(self) -> None:
        for d in self.dispatchers:
            d.close_channel()
        # Clients of the dispatcher first, the dispatcher next, the model last.
        order = sorted(
            self.procs,
            key=lambda p: (p.name.startswith("dispatcher"), p.name.startswith("scriptedllm")),
        )
        for p in order:
            p.stop(grace=3.0)
        self.procs.clear()


@functools.cache
def _has_flag(exe: str, flag: str) -> bool:
    """Whether the binary's --help lists flag (Go's flag package prints `-name`)."""
    res = subprocess.run(
        [exe, "--help"], capture_output=True, text=True, timeout=30, check=False, cwd=_procs.ROOT
    )
    return f"  {flag[1:]} " in res.stdout + res.stderr or f"  {flag} " in res.stdout + res.stderr


@pytest.fixture(scope="session")
def binaries() -> dict[str, Path]:
    """Builds (or locates) the Go binaries once per session."""
    if shutil.which("go") is None and not os.environ.get("DISPATCH_BIN_DIR"):
        pytest.fail("go is not on PATH and DISPATCH_BIN_DIR is not set")
    return {n: _procs.ensure_binary(n) for n in ("dispatcher", "scriptedllm")}


@pytest.fixture(scope="module")
def module_stack(
    tmp_path_factory: pytest.TempPathFactory, binaries: dict[str, Path]
) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("stack"))
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def stack(tmp_path: Path, binaries: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()
