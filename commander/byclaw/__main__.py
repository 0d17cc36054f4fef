"""``python -m commander.byclaw``: serve byclaw workers' capabilities to the dispatcher.

    python -m commander.byclaw --redis redis://127.0.0.1:6379/0 --dispatcher 127.0.0.1:50051

The workers run on their own (``python -m byclaw_gateway_sdk --worker-class
my_agent.MyAgent --redis-host ...`` in ``.venv-byclaw``). Without
``--capability``, the bridge serves what the live workers registered (waiting
``--discover-timeout`` for one). SIGTERM/SIGINT: stop taking work, let running
tasks finish (bounded), then stop.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from commander._cli import add_connection_flags, env, run_command, run_until_signalled
from commander._commander import default_commander_id
from commander._connection import ConnectionConfig
from commander._logging import setup_logging
from commander.byclaw._bridge import ByclawBridge, ByclawSettings
from commander.byclaw._protocol import DEFAULT_WORKER_GROUP


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m commander.byclaw",
        description="Bridge byclaw-gateway-sdk workers (Redis Streams) to the dispatcher.",
    )
    add_connection_flags(p)
    p.add_argument(
        "--redis",
        default=env("BYCLAW_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis of the byclaw workers (env BYCLAW_REDIS_URL; default %(default)s)",
    )
    p.add_argument("--slots", type=int, default=int(env("COMMANDER_SLOTS", "4") or 4))
    p.add_argument("--id", dest="commander_id", default=env("COMMANDER_ID", default_commander_id()))
    p.add_argument(
        "--capability",
        action="append",
        default=[],
        help="serve this byclaw capability (repeatable); default: the live workers' ones",
    )
    p.add_argument(
        "--worker-group",
        default=DEFAULT_WORKER_GROUP,
        help="the workers' consumer group (run_worker's consumer_group; default %(default)s)",
    )
    p.add_argument(
        "--worker-timeout",
        type=_positive,
        default=10.0,
        help="a worker that leaves a probe unacknowledged this long is lost: its task ends "
        "FAILURE (default %(default)s s)",
    )
    p.add_argument(
        "--queue-timeout",
        type=_positive,
        default=30.0,
        help="a task no worker takes within this ends FAILURE (default %(default)s s)",
    )
    p.add_argument(
        "--discover-timeout",
        type=_positive,
        default=30.0,
        help="without --capability, how long to wait for a live worker (default %(default)s s)",
    )
    return p


def build_bridge(args: argparse.Namespace) -> ByclawBridge:
    settings = ByclawSettings(
        redis_url=args.redis,
        worker_group=args.worker_group,
        worker_timeout=args.worker_timeout,
        queue_timeout=args.queue_timeout,
    )
    connection = ConnectionConfig.from_args(args.dispatcher, token=args.token, ca_cert=args.ca_cert)
    return ByclawBridge(
        settings,
        connection,
        slots=args.slots,
        commander_id=args.commander_id,
        capabilities=args.capability,
        discover_timeout=args.discover_timeout,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    bridge = build_bridge(args)

    async def serve() -> None:
        await run_until_signalled(bridge.run, bridge.shutdown, what="byclaw bridge")

    run_command("byclaw-bridge", serve)


if __name__ == "__main__":
    main()
