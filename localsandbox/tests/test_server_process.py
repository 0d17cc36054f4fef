"""The server process: clean shutdown on SIGTERM, and a clear exit without its tools."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from localsandbox.tests.harness import API_KEY, ORG, alive, start_server, xvfb_pids


def test_sigterm_deletes_every_sandbox(x11_tools: None, tmp_path: Path) -> None:
    srv = start_server(tmp_path / "srv")
    try:
        headers = {"x-api-key": API_KEY}
        with httpx.Client(base_url=srv.endpoint, headers=headers, timeout=30) as http:
            sids = []
            for _ in range(2):
                r = http.post(f"/api/orgs/{ORG}/sandboxes", json={"shape": "local-800x600"})
                assert r.status_code == 200, r.text
                sids.append(r.json()["id"])
            r = http.post(
                f"/api/orgs/{ORG}/sandboxes/{sids[0]}/process",
                json={"executable": "/bin/sh", "args": ["-c", "setsid sleep 300 & echo $!"]},
            )
            pid = int(base64.b64decode(r.json()["stdoutBase64"]))
        assert alive(pid) and len(xvfb_pids(srv.state_dir)) == 2
        assert srv.stop(signal.SIGTERM) == 0, srv.log()
        assert not alive(pid)
        assert xvfb_pids(srv.state_dir) == []
        assert not srv.addr_file.exists()
        assert list((srv.state_dir / "sandboxes").iterdir()) == []
        assert "deleted" in srv.log()
    finally:
        srv.stop(signal.SIGKILL)


def test_missing_tools_exit_with_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "LOCALSANDBOX_API_KEY": "k"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "localsandbox", "--listen", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "install_system_deps.sh" in done.stderr
    assert time.monotonic() - start < 30


def test_api_key_is_required(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCALSANDBOX_API_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "localsandbox"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "API key is required" in done.stderr


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:", ":80"])
def test_bad_listen_address(listen: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "localsandbox", "--listen", listen, "--api-key", "k"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
