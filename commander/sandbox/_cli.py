"""Command-line flags of the sandbox provider, shared by ``commander`` and
``python -m commander.sandbox``."""

from __future__ import annotations

import argparse

from commander._cli import env
from commander.sandbox._tools import DEFAULT_ENDPOINT, LOCAL_SHAPE, SandboxSettings


def add_sandbox_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sandbox (the computer.* tools, over the lybic SDK)")
    group.add_argument(
        "--sandbox-endpoint",
        default=env("LYBIC_API_ENDPOINT"),
        help=f"Lybic API endpoint, or the local sandbox server's http://HOST:PORT "
        f"(env LYBIC_API_ENDPOINT; default {DEFAULT_ENDPOINT})",
    )
    group.add_argument(
        "--sandbox-org",
        default=env("LYBIC_ORG_ID"),
        help="Lybic organisation id (env LYBIC_ORG_ID); the API key comes from LYBIC_API_KEY",
    )
    group.add_argument(
        "--sandbox-shape",
        default=env("LYBIC_SANDBOX_SHAPE", ""),
        help="shape of the sandboxes created for tasks that name none "
        f"(env LYBIC_SANDBOX_SHAPE; default {LOCAL_SHAPE} on a local sandbox server, "
        "required on the Lybic cloud)",
    )
    group.add_argument(
        "--sandbox-timeout",
        type=float,
        default=env("LYBIC_TIMEOUT", "300"),
        help="seconds one sandbox API request may take; typing long texts is one request "
        "(env LYBIC_TIMEOUT; default %(default)s)",
    )


def sandbox_settings_from_args(args: argparse.Namespace) -> SandboxSettings:
    """Flags over ``LYBIC_*`` environment variables (``LYBIC_PRECREATE_SID`` included)."""
    return SandboxSettings.from_env(
        endpoint=args.sandbox_endpoint,
        org_id=args.sandbox_org,
        default_shape=args.sandbox_shape,
        timeout=float(args.sandbox_timeout),
    )
