"""A real local sandbox server process for tests, driven through the real lybic SDK.

Used by this package's tests and by the commander's sandbox tests, which start
the server as a process (``python -m localsandbox``) and never import it.

The server needs Xvfb and xdotool (and the tests use xterm as the X
application). When they are missing the ``x11_tools`` fixture runs
scripts/install_system_deps.sh once (as root); only if they are still missing
do the tests that need them skip, saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from lybic import LybicAuth, LybicClient, Sandbox
from PIL import Image, ImageChops

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = ROOT / "scripts" / "install_system_deps.sh"
TOOLS = ("Xvfb", "xdotool", "xterm")
ORG = "ORG-local-test"
API_KEY = "lysk-local-test-key"


def _missing() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@pytest.fixture(scope="session")
def x11_tools() -> None:
    """Skips (with the reason) only when the tools are missing and cannot be installed."""
    missing = _missing()
    if not missing:
        return
    detail = ""
    if os.geteuid() == 0 and INSTALL_SCRIPT.exists():
        try:
            done = subprocess.run(
                ["bash", str(INSTALL_SCRIPT)],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            lines = (done.stdout + done.stderr).strip().splitlines()
            detail = lines[-1] if lines else f"install script exited {done.returncode}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail = str(exc)
    else:
        detail = "not root, so scripts/install_system_deps.sh cannot install them"
    missing = _missing()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed and could not be installed: {detail}")


@dataclass
class LocalServer:
    """A running ``python -m localsandbox`` process."""

    proc: subprocess.Popen[bytes]
    addr: str
    state_dir: Path
    log_path: Path
    addr_file: Path

    @property
    def endpoint(self) -> str:
        return f"http://{self.addr}"

    def client(self, *, api_key: str = API_KEY, org: str = ORG) -> LybicClient:
        # max_retries=0: the SDK retries every non-2xx answer, which would only
        # slow the error tests down (and could repeat an action).
        return LybicClient(
            LybicAuth(org_id=org, api_key=api_key, endpoint=self.endpoint),
            timeout=30,
            max_retries=0,
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, grace: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)


def start_server(workdir: Path, *extra: str) -> LocalServer:
    workdir.mkdir(parents=True, exist_ok=True)
    addr_file = workdir / "server.addr"
    log_path = workdir / "server.log"
    state_dir = workdir / "state"
    argv = [
        sys.executable,
        "-m",
        "localsandbox",
        "--listen",
        "127.0.0.1:0",
        "--addr-file",
        str(addr_file),
        "--org-id",
        ORG,
        "--state-dir",
        str(state_dir),
        *extra,
    ]
    env = {**os.environ, "LOCALSANDBOX_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
            start_new_session=True,
        )
    server = LocalServer(proc, "", state_dir, log_path, addr_file)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
        text = addr_file.read_text().strip() if addr_file.exists() else ""
        if text.endswith(tuple("0123456789")) and ":" in text:
            server.addr = text
            return server
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"server did not publish its address:\n{server.log()}")


def xvfb_pids(state_dir: Path) -> list[int]:
    """Xvfb processes started by the server that owns ``state_dir``."""
    pids = []
    needle = str(state_dir).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"Xvfb\0") and needle in cmd and alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


# ---------------------------------------------------------------------- the screen

#: Where ``xterm -geometry 80x24+0+0`` draws.
XTERM_BOX = (0, 0, 480, 300)


async def screenshot(s: Sandbox, sid: str) -> Image.Image:
    _, image, b64 = await s.get_screenshot(sid)
    assert b64, "the SDK only fills the base64 string for WebP"
    assert isinstance(image, Image.Image)
    return image.convert("RGB")


def changed_pixels(a: Image.Image, b: Image.Image, box: tuple[int, int, int, int]) -> int:
    diff = ImageChops.difference(a.crop(box), b.crop(box)).convert("L")
    return sum(diff.histogram()[33:])


async def settled_screenshot(
    s: Sandbox,
    sid: str,
    box: tuple[int, int, int, int] = XTERM_BOX,
    *,
    unlike: Image.Image | None = None,
    within: float = 15.0,
) -> Image.Image:
    """A screenshot once ``box`` holds still (two shots in a row alike) and, given
    ``unlike``, differs from it.

    X clients draw in their own time after an input or a start: this waits for
    what the test expects to see instead of sleeping for a guessed while.
    """
    with anyio.fail_after(within):
        last = await screenshot(s, sid)
        while True:
            await anyio.sleep(0.1)  # polling interval, not a synchronisation
            shot = await screenshot(s, sid)
            still = changed_pixels(last, shot, box) == 0
            if still and (unlike is None or changed_pixels(unlike, shot, box) > 0):
                return shot
            last = shot
