"""What the command-line entry points share: env-backed flags, logging, tracing,
signals, and running the event loop (:func:`run_command`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio

from commander._connection import ConnectionConfig
from commander._logging import LOG_FORMATS, setup_logging
from commander._provider import ToolProvider
from commander._tracing import TracingConfigError, setup_tracing

__all__ = [
    "add_connection_flags",
    "add_provider_id_flag",
    "env",
    "run_command",
    "run_until_signalled",
    "serve_provider",
    "setup_logging",
    "start_tracing",
]

_log = logging.getLogger("commander.cli")


def start_tracing(service_name: str) -> Callable[[], None]:
    """Tracing as the OTEL_* environment asks (off by default); returns its flush.

    A setting we cannot honour ends the program with a clear message (exit 2).
    """
    from commander._commander import VERSION

    try:
        return setup_tracing(service_name, VERSION)
    except TracingConfigError as exc:
        print(f"{service_name}: {exc}", file=sys.stderr)
        sys.exit(2)


def env(name: str, default: str | None = None) -> str | None:
    """The environment variable ``name``, or ``default`` when unset or empty."""
    value = os.environ.get(name)
    return value if value else default


class _Addresses(argparse.Action):
    """``--dispatcher``: repeatable; the values (each maybe a comma list) are joined
    with commas, replacing the default on first use."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, "_dispatcher_given", False)
        previous = getattr(namespace, self.dest, "") if given else ""
        setattr(namespace, self.dest, ",".join(v for v in (previous, str(values)) if v))
        namespace._dispatcher_given = True


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dispatcher",
        action=_Addresses,
        default=env("DISPATCHER_ADDR", "127.0.0.1:50051"),
        help="dispatcher address host:port; several: repeat the flag or separate with "
        "commas (a lost stream reconnects to the next), or one name resolving to several "
        "(dns:///name:port) (env DISPATCHER_ADDR; default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=env("COMMANDER_TOKEN"),
        help="bearer token for the dispatcher (env COMMANDER_TOKEN; prefer the env var: "
        "flags are visible in the process list)",
    )
    parser.add_argument(
        "--ca-cert",
        default=env("COMMANDER_CA_CERT"),
        help="PEM CA certificate: use TLS and trust this CA (env COMMANDER_CA_CERT)",
    )
    parser.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log level (env LOG_LEVEL; default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default=env("LOG_FORMAT", "text"),
        choices=LOG_FORMATS,
        type=str.lower,
        help="log lines: text, or json objects with time, level, logger, message and the "
        "task_id/session_id when known (env LOG_FORMAT; default %(default)s)",
    )


def add_provider_id_flag(parser: argparse.ArgumentParser, *, env_name: str, default: str) -> None:
    """``--id``: a tool provider's id (``args.provider_id``), from ``env_name`` by default."""
    parser.add_argument(
        "--id",
        dest="provider_id",
        default=env(env_name, default),
        help="provider id sent in the hello (default %(default)s)",
    )


def run_command(name: str, serve: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``serve()`` on a new event loop until it returns, with tracing as the
    environment asks (flushed at the end). A Ctrl-C that comes before ``serve``
    watches the signals exits 130."""
    shutdown_tracing = start_tracing(name)
    try:
        anyio.run(serve)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        shutdown_tracing()


def serve_provider(
    command: str,
    provider: ToolProvider,
    connection: ConnectionConfig,
    *,
    close: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """The life of a tool-provider process: serve ``provider`` over ``connection``
    until SIGTERM/SIGINT (then its graceful shutdown); ``close`` runs at the end,
    also when the serving was cancelled."""

    async def run() -> None:
        try:
            await provider.run(connection)
        finally:
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()

    async def serve() -> None:
        await run_until_signalled(run, provider.shutdown, what=command)

    run_command(command, serve)


async def run_until_signalled(
    run: Callable[[], Coroutine[Any, Any, None]],
    shutdown: Callable[[], Coroutine[Any, Any, None]],
    *,
    what: str,
) -> None:
    """Run ``run()``; the first SIGTERM/SIGINT starts ``shutdown()``, a second one aborts."""
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                count = 0
                async for signum in signals:
                    count += 1
                    if count == 1:
                        _log.info(
                            "%s: %s, shutting down gracefully",
                            what,
                            signal.Signals(signum).name,
                        )
                        tg.start_soon(shutdown)
                    else:
                        _log.warning("%s: second signal, aborting", what)
                        tg.cancel_scope.cancel()
                        return

        tg.start_soon(watch_signals)
        await run()
        tg.cancel_scope.cancel()
