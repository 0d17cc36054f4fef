"""Running the API: bind, serve with uvicorn, publish the address, clean up on a signal."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import uvicorn

from localsandbox._api import create_app
from localsandbox._errors import SandboxError
from localsandbox._sandboxes import Limits, SandboxManager

log = logging.getLogger(__name__)

#: The system tools a server needs (Debian: xvfb, xdotool).
REQUIRED_TOOLS = ("Xvfb", "xdotool")


class MissingToolsError(SandboxError):
    """Xvfb or xdotool is not installed."""


@dataclass(frozen=True)
class ServerConfig:
    """How to run the local sandbox server."""

    api_key: str
    host: str = "127.0.0.1"
    port: int = 0
    #: Only this organisation id is served (403 for others); None serves any.
    org_id: str | None = None
    #: Where sandboxes keep their files and logs; a temporary directory if None.
    state_dir: Path | None = None
    #: Written with "host:port" once the server accepts connections; removed on exit.
    addr_file: Path | None = None
    limits: Limits = field(default_factory=Limits)
    #: Seconds that running requests get to finish on shutdown.
    shutdown_grace: int = 5
    access_log: bool = False


def check_tools() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise MissingToolsError(
            f"missing {', '.join(missing)}: run scripts/install_system_deps.sh (as root)"
        )


class _Server(uvicorn.Server):
    # uvicorn re-raises a caught SIGTERM after its own shutdown, which would kill
    # the process before the sandboxes are deleted; serve() handles signals instead.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _format_addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _watch_signals(server: uvicorn.Server) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("%s: shutting down", signal.Signals(sig).name)
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True


async def _publish_addr(server: uvicorn.Server, addr: str, addr_file: Path | None) -> None:
    # uvicorn has no "started" event to wait on, only this flag.
    while not server.started:  # noqa: ASYNC110
        await anyio.sleep(0.01)
    log.info("local sandbox serving on http://%s", addr)
    if addr_file is not None:
        await anyio.to_thread.run_sync(_write_atomic, addr_file, addr + "\n")


async def serve(config: ServerConfig) -> None:
    """Serves until SIGTERM/SIGINT; then deletes every sandbox and returns.

    Sets ``XAUTHORITY`` in this process's environment to the server's cookie
    file (the in-process screenshot reads it from there), so run one server
    per process.
    """
    check_tools()
    own_state = config.state_dir is None
    if config.state_dir is None:
        state_dir = Path(await anyio.to_thread.run_sync(tempfile.mkdtemp, "", "localsandbox-"))
    else:
        state_dir = config.state_dir
    sock = _bind(config.host, config.port)
    addr = _format_addr(sock)
    try:
        async with SandboxManager(state_dir, config.limits) as manager:
            os.environ["XAUTHORITY"] = str(manager.xauthority)
            app = create_app(manager, api_key=config.api_key, org_id=config.org_id)
            server = _Server(
                uvicorn.Config(
                    app,
                    lifespan="off",
                    http="h11",
                    log_config=None,
                    access_log=config.access_log,
                    timeout_graceful_shutdown=config.shutdown_grace,
                )
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, server)
                tg.start_soon(_publish_addr, server, addr, config.addr_file)
                await server.serve(sockets=[sock])
                tg.cancel_scope.cancel()
    finally:
        sock.close()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                _cleanup, config.addr_file, state_dir if own_state else None
            )


def _cleanup(addr_file: Path | None, state_dir: Path | None) -> None:
    if addr_file is not None:
        with contextlib.suppress(FileNotFoundError):
            addr_file.unlink()
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
