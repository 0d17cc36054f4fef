"""The entry points as real processes, against the in-process fakes; and TLS."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import grpc
import pytest

from commander import Commander, PlannerRegistry, SessionContext
from commander.tests.conftest import fast_connection
from commander.tests.fakes import DispatcherServer, Reply, ScriptedLLM

pytestmark = pytest.mark.anyio

STARTUP = 30.0  # a cold interpreter importing grpc and openai on a small machine


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMMANDER_", "LLM_"))}
    env.update(extra)
    return env


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_commander_process_runs_a_session_and_stops_on_sigterm(
    dispatcher: DispatcherServer, llm: ScriptedLLM, tmp_path: Path, log_format: str
) -> None:
    llm.replies.append(Reply.text("from a real process"))
    log_path = tmp_path / "commander.log"
    command = [
        sys.executable,
        "-m",
        "commander",
        "--dispatcher",
        dispatcher.target,
        "--slots",
        "1",
        "--llm-base-url",
        llm.base_url,
        "--llm-model",
        "scripted",
    ]
    env = child_env(
        LLM_API_KEY="sk-must-not-leak", COMMANDER_TOKEN="tok-must-not-leak", LOG_FORMAT=log_format
    )
    with log_path.open("wb") as log:
        async with await anyio.open_process(
            command, env=env, stdout=subprocess.DEVNULL, stderr=log
        ) as process:
            try:
                slot = await dispatcher.servicer.next_slot(within=STARTUP)
                assert slot.metadata.get("authorization") == "Bearer tok-must-not-leak"
                assert slot.hello is not None and "planner:chat" in slot.hello.capabilities
                await slot.start("say something")
                packets = await slot.recv_until_terminal()
                assert packets[-1].result.result == "from a real process"
                process.send_signal(signal.SIGTERM)
                with anyio.fail_after(10):
                    code = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
    assert code == 0
    text = log_path.read_text()
    assert "session start task=task-1" in text
    assert "session end task=task-1" in text and "outcome=SUCCESS" in text
    assert "must-not-leak" not in text
    if log_format == "json":
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
        start = next(line for line in lines if line["message"].startswith("session start"))
        assert start["task_id"] == "task-1" and start["session_id"]
        assert start["logger"] == "commander.session" and start["level"] == "INFO"


async def test_commander_tools_process_serves_the_workspace(
    dispatcher: DispatcherServer, tmp_path: Path
) -> None:
    root = tmp_path / "ws"
    command = [
        sys.executable,
        "-m",
        "commander.tools_main",
        "--dispatcher",
        dispatcher.target,
        "--root",
        str(root),
    ]
    async with await anyio.open_process(
        command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as process:
        try:
            fake = await dispatcher.servicer.next_provider(within=STARTUP)
            assert fake.hello is not None
            assert {t.name for t in fake.hello.tools} == {
                "workspace.write_file",
                "workspace.read_file",
                "workspace.list_files",
                "text.sha256",
            }
            await fake.invoke("1", "text.sha256", {"text": "abc"})
            answer = (await fake.recv()).result
            assert json.loads(answer.result_json)["sha256"] == hashlib.sha256(b"abc").hexdigest()
            await fake.invoke("2", "workspace.write_file", {"path": "../x", "content": "x"})
            answer = (await fake.recv()).result
            assert answer.error.code == 2  # INVALID_ARGUMENTS
            await fake.invoke("3", "workspace.write_file", {"path": "ok.txt", "content": "hi"})
            await fake.recv()
            assert (root / "ok.txt").read_text() == "hi"
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_with_a_ca_certificate(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    await anyio.run_process(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
    )
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server = DispatcherServer(credentials=credentials)
    await server.start()
    planners = PlannerRegistry()

    @planners.register("hi")
    async def hi(ctx: SessionContext) -> str:
        return "over TLS"

    try:
        connection = fast_connection(server.target, root_certificates=cert.read_bytes())
        async with Commander(connection, slots=1, planners=planners):
            slot = await server.servicer.next_slot()
            await slot.start(planner="hi")
            packets = await slot.recv_until_terminal()
            assert packets[-1].result.result == "over TLS"
    finally:
        await server.stop()
