"""One Xvfb X server per sandbox, protected by an MIT-MAGIC-COOKIE.

Xvfb picks a free display number itself (``-displayfd``) and writes it when it
is ready for clients, so there is no race on ``/tmp/.X11-unix`` and no polling.
Without a cookie any local user could connect to the display, watch it and
type into it; the server's one cookie file holds a wildcard entry (no host, no
display number) that every display of this server accepts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.abc

from localsandbox._errors import DisplayError

log = logging.getLogger(__name__)

_FAMILY_WILD = 0xFFFF
_START_TIMEOUT = 15.0
_STOP_GRACE = 5.0


def write_xauthority(path: Path) -> None:
    """Writes a fresh cookie file (mode 0600) with one wildcard MIT-MAGIC-COOKIE-1 entry."""

    def counted(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b

    entry = (
        struct.pack(">H", _FAMILY_WILD)
        + counted(b"")  # any address
        + counted(b"")  # any display number
        + counted(b"MIT-MAGIC-COOKIE-1")
        + counted(secrets.token_bytes(16))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(entry)


@dataclass
class Display:
    """A running Xvfb: ``name`` is the DISPLAY value (``:3``)."""

    number: int
    width: int
    height: int
    process: anyio.abc.Process
    log_path: Path

    @property
    def name(self) -> str:
        return f":{self.number}"

    def running(self) -> bool:
        return self.process.returncode is None

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; always reaps the process."""
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(_STOP_GRACE):
                    await self.process.wait()
                if self.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
            await self.process.aclose()


async def start_display(
    width: int, height: int, *, xauthority: Path, log_path: Path, env: dict[str, str]
) -> Display:
    """Starts Xvfb with a ``width``x``height``x24 screen; returns once it accepts clients."""
    argv = [
        "Xvfb",
        "-displayfd",
        "1",
        "-screen",
        "0",
        f"{width}x{height}x24",
        "-nolisten",
        "tcp",
        "-auth",
        str(xauthority),
        # Without -noreset the server resets whenever its last client leaves,
        # which recentres the pointer between two xdotool calls.
        "-noreset",
        "-dpi",
        "96",
    ]
    log_file = await anyio.to_thread.run_sync(_open_log, log_path)
    with log_file:
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise DisplayError(f"cannot start Xvfb: {exc.strerror or exc}") from exc
    try:
        number = await _read_display_number(process)
    except BaseException:
        display = Display(-1, width, height, process, log_path)
        await display.stop()
        raise
    log.info("Xvfb :%d started (%dx%d, pid %d)", number, width, height, process.pid)
    return Display(number, width, height, process, log_path)


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


async def _read_display_number(process: anyio.abc.Process) -> int:
    assert process.stdout is not None
    buf = b""
    with anyio.move_on_after(_START_TIMEOUT) as scope:
        while b"\n" not in buf:
            try:
                buf += await process.stdout.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if len(buf) > 64:
                break
    line = buf.split(b"\n", 1)[0].strip()
    if scope.cancelled_caught:
        raise DisplayError(f"Xvfb did not become ready within {_START_TIMEOUT:.0f} s")
    if not line.isdigit():
        raise DisplayError("Xvfb exited before it was ready (see its log)")
    return int(line)
