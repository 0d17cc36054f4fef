"""``commander``: run planners for the dispatcher.

    commander --dispatcher 127.0.0.1:50051 --slots 4 --llm-base-url http://127.0.0.1:8080/v1

Every flag has an environment variable (see ``--help``). SIGTERM/SIGINT: stop
taking work, give running sessions ``--shutdown-grace`` seconds, then stop them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry

from commander import _metrics
from commander._a2a import A2APlanner, A2ASettings, parse_agents
from commander._chat import DEFAULT_MODEL, ChatPlanner, LLMSettings
from commander._cli import (
    add_connection_flags,
    env,
    run_command,
    run_until_signalled,
    setup_logging,
)
from commander._commander import VERSION, Commander, default_commander_id
from commander._connection import ConnectionConfig
from commander._llm import (
    DEFAULT_API_KEY,
    DEFAULT_BASE_URL,
    ModelTarget,
    parse_allowed_endpoints,
)
from commander._planners import PlannerRegistry
from commander._pricing import PriceTable
from commander._provider import ToolProvider
from commander._timeouts import CONTENT_WINDOW, HANDOVER_BUFFER, HANDOVER_TIMEOUT
from commander._workspace import workspace_provider
from commander.gui._planner import GuiPlanner, GuiSettings
from commander.sandbox import SandboxSettings, SandboxTools, sandbox_provider
from commander.sandbox._cli import add_sandbox_flags, sandbox_settings_from_args


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label must be key=value, got {text!r}")
    return key, value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def _allowed_endpoints(text: str) -> tuple[str, ...]:
    try:
        return parse_allowed_endpoints(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="commander", description="Run LLM agent planners for the dispatcher."
    )
    add_connection_flags(parser)
    parser.add_argument(
        "--slots",
        type=_positive_int,
        default=env("COMMANDER_SLOTS", "4"),  # argparse applies `type` to string defaults
        help="sessions run at once, one ChatStream each (env COMMANDER_SLOTS; default %(default)s)",
    )
    parser.add_argument(
        "--id",
        dest="commander_id",
        default=env("COMMANDER_ID", default_commander_id()),
        help="commander id sent in the hello (env COMMANDER_ID; default host-pid)",
    )
    parser.add_argument(
        "--label",
        dest="labels",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label sent in the hello; repeatable",
    )
    parser.add_argument(
        "--tenant",
        dest="tenants",
        action="append",
        default=None,
        metavar="NAME",
        help=(
            "take only this tenant's tasks (a name of the dispatcher's tenants file); "
            "repeatable (env COMMANDER_TENANTS, comma-separated); none: every tenant's"
        ),
    )
    parser.add_argument(
        "--llm-base-url",
        default=env("LLM_BASE_URL", DEFAULT_BASE_URL),
        help="default OpenAI-compatible endpoint (env LLM_BASE_URL; default %(default)s)",
    )
    parser.add_argument(
        "--llm-model",
        default=env("LLM_MODEL", DEFAULT_MODEL),
        help="default model name (env LLM_MODEL; default %(default)s)",
    )
    parser.add_argument(
        "--llm-api-key",
        default=env("LLM_API_KEY", DEFAULT_API_KEY),
        help="default API key (env LLM_API_KEY; prefer the env var); sent only to "
        "--llm-base-url, never to an endpoint a task names",
    )
    parser.add_argument(
        "--llm-allowed-endpoints",
        type=_allowed_endpoints,
        default=env("LLM_ALLOWED_ENDPOINTS", ""),
        metavar="URL,...",
        help="comma-separated URL prefixes a task may name as its model endpoint, besides "
        "the planner's own endpoint (--llm-base-url for chat, --gui-base-url for gui), "
        "always allowed; such an endpoint gets the task's own key or none. Link-local and "
        "cloud metadata addresses are refused whatever this says (env "
        "LLM_ALLOWED_ENDPOINTS; default: none)",
    )
    parser.add_argument(
        "--llm-max-turns",
        type=_positive_int,
        default=env("LLM_MAX_TURNS", "8"),
        help="model turns per session, tool round trips included (env LLM_MAX_TURNS)",
    )
    parser.add_argument(
        "--llm-exclude-tools",
        default=env("LLM_EXCLUDE_TOOLS", ""),
        help="comma-separated tool name prefixes never offered to the chat model, e.g. "
        "'computer.,mobile.' for a small-context model (env LLM_EXCLUDE_TOOLS)",
    )
    parser.add_argument(
        "--no-llm-tools",
        action="store_true",
        help="do not offer the session's tools to the model (for models without function calling)",
    )
    parser.add_argument(
        "--with-tools",
        metavar="DIR",
        default=env("COMMANDER_WITH_TOOLS"),
        help="also serve the workspace tools on DIR in this process (env COMMANDER_WITH_TOOLS)",
    )
    parser.add_argument(
        "--prices",
        default=env("COMMANDER_PRICES"),
        metavar="FILE",
        help="JSON or TOML per-model price table, over the built-in one (env COMMANDER_PRICES)",
    )
    remote = parser.add_argument_group("a2a planner (planner name 'a2a')")
    remote.add_argument(
        "--a2a-agents",
        default=env("A2A_AGENTS", ""),
        metavar="URL,...",
        help="base URLs of the remote A2A agents a task may name in its label 'a2a_agent' "
        "(the first is the default); the 'a2a' planner is offered only when set (env A2A_AGENTS)",
    )
    remote.add_argument(
        "--a2a-token",
        default=env("A2A_TOKEN", ""),
        help="bearer token sent to the remote A2A agents (env A2A_TOKEN; prefer the env var)",
    )
    gui = parser.add_argument_group("gui planner (planner name 'gui')")
    gui.add_argument(
        "--gui-base-url",
        default=env("GUI_LLM_BASE_URL"),
        help="OpenAI-compatible endpoint of the GUI model (env GUI_LLM_BASE_URL; "
        "default: --llm-base-url)",
    )
    gui.add_argument(
        "--gui-model",
        default=env("GUI_LLM_MODEL", "ui-tars"),
        help="the GUI (vision) model (env GUI_LLM_MODEL; default %(default)s)",
    )
    gui.add_argument(
        "--gui-api-key",
        default=env("GUI_LLM_API_KEY"),
        help="API key of the GUI model (env GUI_LLM_API_KEY; default: --llm-api-key); sent "
        "only to the GUI model's endpoint",
    )
    gui.add_argument(
        "--gui-output-format",
        choices=["auto", "ui-tars", "pyautogui", "json"],
        default=env("GUI_OUTPUT_FORMAT", "auto"),
        help="how the GUI model writes actions; auto: json (schema-constrained) for a text "
        "observation, else ui-tars (env GUI_OUTPUT_FORMAT; default %(default)s)",
    )
    gui.add_argument(
        "--gui-observation",
        choices=["auto", "screenshot", "text", "both"],
        default=env("GUI_OBSERVATION", "auto"),
        help="what the GUI model is shown: the screenshot, a text description of the screen "
        "(computer.describe_screen; for text-only models), or both; auto: text for known "
        "text-only models (smollm*, tinyllama*), else screenshot (env GUI_OBSERVATION)",
    )
    gui.add_argument(
        "--gui-response-format",
        choices=["llama-cpp", "json-schema", "off"],
        default=env("GUI_RESPONSE_FORMAT", "llama-cpp"),
        help="how the json format's schema constrains decoding: llama-cpp-python's "
        "json_object+schema, OpenAI's json_schema, or off (env GUI_RESPONSE_FORMAT)",
    )
    gui.add_argument(
        "--gui-max-steps",
        type=_positive_int,
        default=env("GUI_MAX_STEPS", "50"),
        help="step limit of a GUI task whose config sets none (env GUI_MAX_STEPS; "
        "default %(default)s)",
    )
    gui.add_argument(
        "--gui-coordinates",
        choices=["relative", "smart-resize", "screen"],
        default=env("GUI_COORDINATES", "relative"),
        help="the GUI model's coordinates: relative 0..1000 (UI-TARS, Doubao), smart-resize "
        "(UI-TARS-1.5 absolute), screen pixels (env GUI_COORDINATES; default %(default)s)",
    )
    gui.add_argument(
        "--gui-grounding-model",
        default=env("GUI_GROUNDING_MODEL"),
        help="NORMAL mode's grounding model when a task names none (env GUI_GROUNDING_MODEL; "
        "same endpoint as the GUI model)",
    )
    add_sandbox_flags(parser)
    parser.add_argument(
        "--no-sandbox-tools",
        action="store_true",
        default=env("COMMANDER_NO_SANDBOX_TOOLS") is not None,
        help="do not serve the computer.* sandbox tools in this process (run "
        "`python -m commander.sandbox` instead; env COMMANDER_NO_SANDBOX_TOOLS)",
    )
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port (also: ENABLE_PROMETHEUS=true, port "
        "PROMETHEUS_PORT, default 8000)",
    )
    metrics.add_argument(
        "--metrics-host",
        default=env("PROMETHEUS_HOST", "127.0.0.1"),
        help="address the /metrics listener binds (env PROMETHEUS_HOST; default %(default)s)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=env("COMMANDER_SHUTDOWN_GRACE", "10"),
        help="seconds running sessions may go on after SIGTERM (default %(default)s)",
    )
    parser.add_argument(
        "--handover-timeout",
        type=float,
        default=env("COMMANDER_HANDOVER_TIMEOUT", str(HANDOVER_TIMEOUT)),
        help="seconds a running session goes on without a dispatcher, waiting to re-attach "
        "to a restarted or another one, before it is abandoned; 0: sessions end with their "
        "stream (env COMMANDER_HANDOVER_TIMEOUT; default %(default)s)",
    )
    parser.add_argument(
        "--handover-buffer",
        type=_positive_int,
        default=env("COMMANDER_HANDOVER_BUFFER", str(HANDOVER_BUFFER)),
        help="packets a session keeps until the dispatcher has recorded them; the planner "
        "waits when they are full, and a session away from its dispatcher that fills them is "
        "abandoned (env COMMANDER_HANDOVER_BUFFER; default %(default)s)",
    )
    parser.add_argument(
        "--content-window",
        type=_non_negative_int,
        default=env("COMMANDER_CONTENT_WINDOW", str(CONTENT_WINDOW)),
        help="credit window: a session's content waits while this many of its packets (or "
        "8 Ki characters of its content) are unacknowledged by the dispatcher, so that a "
        "stop's `stopped` (control never waits) queues behind at most that; 0: off "
        "(env COMMANDER_CONTENT_WINDOW; default %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    return parser


def build_commander(args: argparse.Namespace) -> Commander:
    """The Commander the parsed flags describe."""
    connection = ConnectionConfig.from_args(args.dispatcher, token=args.token, ca_cert=args.ca_cert)
    prices = PriceTable.load(args.prices)
    llm = LLMSettings(
        prices=prices,
        base_url=args.llm_base_url,
        model=args.llm_model,
        api_key=args.llm_api_key,
        allowed_endpoints=args.llm_allowed_endpoints,
        max_turns=args.llm_max_turns,
        use_tools=not args.no_llm_tools,
        exclude_tool_prefixes=tuple(p for p in args.llm_exclude_tools.split(",") if p),
    )
    providers: list[ToolProvider] = []
    if args.with_tools:
        providers.append(workspace_provider(args.with_tools))
    sandbox_tools: SandboxTools | None = None
    settings: SandboxSettings = sandbox_settings_from_args(args)
    # Served here by default once a sandbox API is configured (the local sandbox
    # server's endpoint, or Lybic credentials); without one the tools could only fail.
    if not args.no_sandbox_tools and settings.configured:
        sandbox_tools = SandboxTools(settings)
        providers.append(sandbox_provider(sandbox_tools))
    gui = GuiSettings(
        base_url=args.gui_base_url or args.llm_base_url,
        model=args.gui_model,
        api_key=args.gui_api_key or args.llm_api_key,
        grounding=(
            ModelTarget(
                args.gui_base_url or args.llm_base_url,
                args.gui_grounding_model,
                args.gui_api_key or args.llm_api_key,
            )
            if args.gui_grounding_model
            else None
        ),
        allowed_endpoints=args.llm_allowed_endpoints,
        output_format=args.gui_output_format,
        observation=args.gui_observation,
        response_format=args.gui_response_format,
        steps=args.gui_max_steps,
        coordinates=args.gui_coordinates,
        prices=prices,
    )
    planners = PlannerRegistry(
        {
            "chat": ChatPlanner(llm),
            "gui": GuiPlanner(gui, local_tools=sandbox_tools, close_tools=True),
        }
    )
    if agents := parse_agents(args.a2a_agents):
        planners.register(
            "a2a", A2APlanner(A2ASettings(allowed_agents=agents, token=args.a2a_token))
        )
    return Commander(
        connection,
        slots=args.slots,
        commander_id=args.commander_id,
        labels=dict(args.labels),
        tenants=tenants_from_args(args),
        planners=planners,
        tool_providers=providers,
        shutdown_grace=args.shutdown_grace,
        handover_timeout=max(0.0, args.handover_timeout),
        handover_buffer=args.handover_buffer,
        content_window=args.content_window,
    )


def tenants_from_args(args: argparse.Namespace) -> list[str]:
    """The tenants the commander serves: the ``--tenant`` flags, else ``COMMANDER_TENANTS``."""
    names: list[str] = args.tenants or (env("COMMANDER_TENANTS") or "").split(",")
    return [n.strip() for n in names if n.strip()]


def metrics_port(args: argparse.Namespace) -> int | None:
    """The /metrics port the flags and environment ask for, or None (metrics off)."""
    if args.metrics_port is not None:
        return int(args.metrics_port)
    if (env("ENABLE_PROMETHEUS") or "").lower() in ("1", "true", "yes", "on"):
        return int(env("PROMETHEUS_PORT", "8000") or "8000")
    return None


def start_metrics(
    args: argparse.Namespace, registry: CollectorRegistry | None = None
) -> WSGIServer | None:
    """Install the metrics and serve /metrics in a thread, if enabled; returns the server."""
    port = metrics_port(args)
    if port is None:
        return None
    registry = registry if registry is not None else REGISTRY
    _metrics.install(_metrics.CommanderMetrics(registry))
    server, _ = _metrics.serve(port, args.metrics_host, registry)
    return server


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``commander`` command."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    commander = build_commander(args)
    start_metrics(args)

    async def serve() -> None:
        await run_until_signalled(commander.run, commander.shutdown, what="commander")

    run_command("commander", serve)


if __name__ == "__main__":
    main()
