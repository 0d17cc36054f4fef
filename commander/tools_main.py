"""``commander-tools``: serve the example workspace toolset as its own process.

    commander-tools --dispatcher 127.0.0.1:50051 --root ./workspace

Tools: ``workspace.write_file``, ``workspace.read_file``, ``workspace.list_files``
(confined to ``--root``) and ``text.sha256``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from commander import _cli
from commander._connection import ConnectionConfig
from commander._workspace import workspace_provider


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="commander-tools", description="Serve the workspace tools to the dispatcher."
    )
    _cli.add_connection_flags(parser)
    parser.add_argument(
        "--root",
        default=_cli.env("TOOLS_ROOT", "workspace"),
        help="the workspace folder the file tools are confined to (env TOOLS_ROOT; "
        "default %(default)s)",
    )
    _cli.add_provider_id_flag(parser, env_name="TOOLS_PROVIDER_ID", default="workspace")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``commander-tools`` command."""
    args = build_parser().parse_args(argv)
    _cli.setup_logging(args.log_level, args.log_format)
    connection = ConnectionConfig.from_args(args.dispatcher, token=args.token, ca_cert=args.ca_cert)
    provider = workspace_provider(args.root, provider_id=args.provider_id)
    _cli.serve_provider("commander-tools", provider, connection)


if __name__ == "__main__":
    main()
