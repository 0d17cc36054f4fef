"""Runs one process for ``execute_process``: no shell, bounded time and output.

The process gets its own session (process group), so a timeout or a
cancelled request kills everything it started in the foreground. Once the
process itself has exited, the server does not wait for background children
that kept its stdout open (``xterm &``): it reads for a short moment more and
returns. Those children live on in the sandbox until it is deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

import anyio
import anyio.abc

from localsandbox._errors import BadRequestError

_DRAIN_AFTER_EXIT = 0.5


@dataclass(frozen=True)
class ProcessResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool


class _Sink:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False
        self.done = anyio.Event()

    async def drain(self, stream: anyio.abc.ByteReceiveStream) -> None:
        try:
            with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
                while True:
                    chunk = await stream.receive()
                    room = self.limit - len(self.data)
                    if room > 0:
                        self.data += chunk[:room]
                    if len(chunk) > room:
                        self.truncated = True  # keep reading so the writer never blocks
        finally:
            self.done.set()


def resolve_executable(executable: str, path_env: str) -> str:
    if "\x00" in executable:
        raise BadRequestError("executable: NUL character")
    if os.sep in executable:
        if not os.path.isfile(executable) or not os.access(executable, os.X_OK):
            raise BadRequestError(f"executable: {executable[:200]!r} is not an executable file")
        return executable
    found = shutil.which(executable, path=path_env)
    if found is None:
        raise BadRequestError(f"executable: {executable[:100]!r} not found on PATH")
    return found


async def _feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.send(data)
        await stream.aclose()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    stdin: bytes | None,
    kill_after: float,
    max_output: int,
) -> ProcessResult:
    """Runs ``argv``; kills its process group after ``kill_after`` seconds."""
    out, err = _Sink(max_output), _Sink(max_output)
    timed_out = False
    try:
        process = await anyio.open_process(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise BadRequestError(f"cannot start {argv[0][:100]!r}: {exc.strerror or exc}") from exc
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdout is not None and process.stderr is not None
            tg.start_soon(out.drain, process.stdout)
            tg.start_soon(err.drain, process.stderr)
            if stdin and process.stdin is not None:
                tg.start_soon(_feed, process.stdin, stdin)
            with anyio.move_on_after(kill_after) as scope:
                await process.wait()
            if scope.cancelled_caught:
                timed_out = True
                _kill_group(process.pid)
                await process.wait()
            # Background children may hold the pipes open; give them a moment, no more.
            with anyio.move_on_after(_DRAIN_AFTER_EXIT):
                await out.done.wait()
                await err.done.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                _kill_group(process.pid)
            await process.aclose()
    code = process.returncode if process.returncode is not None else -signal.SIGKILL
    stderr = bytes(err.data)
    if timed_out:
        stderr += f"\n[localsandbox] killed after the {kill_after:g} s timeout\n".encode()
    return ProcessResult(
        exit_code=code,
        stdout=bytes(out.data),
        stderr=stderr,
        timed_out=timed_out,
        truncated=out.truncated or err.truncated,
    )
