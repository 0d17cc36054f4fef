"""``python -m localsandbox``: run the local sandbox server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import anyio

from localsandbox._sandboxes import Limits
from localsandbox._server import MissingToolsError, ServerConfig, serve


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:0")
    return host.strip("[]"), int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m localsandbox",
        description="A local sandbox server (Xvfb + xdotool) that the lybic SDK can drive.",
    )
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 0), help="HOST:PORT (0: any)")
    p.add_argument("--addr-file", type=Path, help="write the actual HOST:PORT here once serving")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LOCALSANDBOX_API_KEY"),
        help="the x-api-key clients must send (default: $LOCALSANDBOX_API_KEY; prefer the "
        "variable, a command line is visible to other users)",
    )
    p.add_argument("--org-id", help="serve only this organisation id (default: any)")
    p.add_argument("--state-dir", type=Path, help="sandbox files and logs (default: a temp dir)")
    p.add_argument("--max-sandboxes", type=int, default=Limits.max_sandboxes)
    p.add_argument("--process-timeout", type=float, default=Limits.process_timeout, help="seconds")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if not args.api_key:
        p.error("an API key is required: --api-key or $LOCALSANDBOX_API_KEY")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host, port = args.listen
    config = ServerConfig(
        api_key=args.api_key,
        host=host,
        port=port,
        org_id=args.org_id,
        state_dir=args.state_dir,
        addr_file=args.addr_file,
        limits=Limits(max_sandboxes=args.max_sandboxes, process_timeout=args.process_timeout),
        access_log=args.log_level == "debug",
    )
    try:
        anyio.run(serve, config)
    except MissingToolsError as exc:
        print(f"localsandbox: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
