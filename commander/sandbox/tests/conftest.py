"""Fixtures: the local sandbox server and the real dispatcher binary.

The GUI tests run the whole chain for real: a ``python -m localsandbox``
process (Xvfb + xdotool), the dispatcher binary, and in this process the
commander (gui planner + sandbox provider) and a scripted OpenAI-compatible model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from commander.sandbox import SandboxSettings
from localsandbox.tests.harness import (  # noqa: F401 (fixtures)
    API_KEY,
    ORG,
    LocalServer,
    start_server,
    x11_tools,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def sandbox_server(
    x11_tools: None,  # noqa: F811 (the imported fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalServer]:
    srv = start_server(tmp_path_factory.mktemp("gui-localsandbox"), "--process-timeout", "10")
    try:
        yield srv
    finally:
        srv.stop()


def sandbox_settings(server: LocalServer) -> SandboxSettings:
    return SandboxSettings(
        endpoint=server.endpoint, org_id=ORG, api_key=API_KEY, default_shape="local-1024x768"
    )


@dataclass
class DispatcherProc:
    proc: subprocess.Popen[bytes]
    addr: str
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def _dispatcher_binary() -> Path | None:
    bin_dir = Path(os.environ.get("DISPATCH_BIN_DIR") or ROOT / "bin")
    binary = bin_dir / "dispatcher"
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        return None
    bin_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["go", "build", "-o", str(binary), "./cmd/dispatcher"],
        cwd=ROOT / "dispatcher_go",
        capture_output=True,
        timeout=600,
        check=False,
    )
    return binary if done.returncode == 0 and binary.exists() else None


@pytest.fixture(scope="session")
def dispatcher_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DispatcherProc]:
    binary = _dispatcher_binary()
    if binary is None:
        pytest.skip("no dispatcher binary (make build) and no Go toolchain to build it")
    work = tmp_path_factory.mktemp("dispatcher")
    addr_file = work / "addr"
    log_path = work / "dispatcher.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                str(binary),
                "--listen",
                "127.0.0.1:0",
                "--addr-file",
                str(addr_file),
                "--log-format",
                "text",
                "--tool-timeout",
                "60s",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(work),
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    addr = ""
    while time.monotonic() < deadline and not addr:
        if proc.poll() is not None:
            raise AssertionError(f"dispatcher exited: {log_path.read_text(errors='replace')}")
        text = addr_file.read_text().strip() if addr_file.exists() else ""
        if text and text[-1].isdigit():
            addr = text
        else:
            time.sleep(0.05)
    if not addr:
        proc.kill()
        raise AssertionError("dispatcher did not publish its address")
    try:
        yield DispatcherProc(proc, addr, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
