"""``python -m commander.sandbox``: serve the ``computer.*`` tools as their own process.

    LYBIC_ORG_ID=... LYBIC_API_KEY=... python -m commander.sandbox --dispatcher 127.0.0.1:50051

For the local sandbox server: ``--sandbox-endpoint http://HOST:PORT`` with its
org id and API key. Run commanders with ``--no-sandbox-tools`` then (a tool
name is served by one provider only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from commander import _cli
from commander._connection import ConnectionConfig
from commander.sandbox._cli import add_sandbox_flags, sandbox_settings_from_args
from commander.sandbox._provider import sandbox_provider
from commander.sandbox._tools import SandboxTools


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m commander.sandbox",
        description="Serve the computer.* sandbox tools to the dispatcher.",
    )
    _cli.add_connection_flags(parser)
    add_sandbox_flags(parser)
    _cli.add_provider_id_flag(parser, env_name="SANDBOX_PROVIDER_ID", default="sandbox")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m commander.sandbox``."""
    args = build_parser().parse_args(argv)
    _cli.setup_logging(args.log_level, args.log_format)
    settings = sandbox_settings_from_args(args)
    if not settings.configured:
        sys.exit(
            "commander.sandbox: no sandbox API configured: set LYBIC_ORG_ID and LYBIC_API_KEY, "
            "or --sandbox-endpoint for the local sandbox server"
        )
    connection = ConnectionConfig.from_args(args.dispatcher, token=args.token, ca_cert=args.ca_cert)
    tools = SandboxTools(settings)
    provider = sandbox_provider(tools, provider_id=args.provider_id)
    _cli.serve_provider("commander-sandbox", provider, connection, close=tools.aclose)


if __name__ == "__main__":
    main()
