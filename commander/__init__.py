"""The commander: runs LLM agent planners for the dispatcher over gRPC ChatStreams.

The public surface is what ``__all__`` lists; everything else (modules with a
leading underscore, ``commander._gen``) may change without notice.
"""

from commander._chat import ChatPlanner, LLMSettings
from commander._commander import VERSION as __version__
from commander._commander import Commander
from commander._connection import ConnectionConfig
from commander._context import Planner, PlannerOutput, SessionContext
from commander._errors import (
    CommanderError,
    InvalidToolArgumentsError,
    ModelError,
    PlannerNotFoundError,
    ToolCancelledError,
    ToolDeniedError,
    ToolError,
    ToolExecutionError,
    ToolTimeoutError,
    ToolUnavailableError,
    UnknownToolError,
)
from commander._planners import PlannerRegistry
from commander._pricing import ModelPrice, PriceTable
from commander._provider import ToolProvider
from commander._workspace import workspace_provider
from commander.gui._planner import GuiPlanner, GuiSettings
from commander.sandbox import SandboxSettings, SandboxTools, sandbox_provider

__all__ = [
    "ChatPlanner",
    "Commander",
    "CommanderError",
    "ConnectionConfig",
    "GuiPlanner",
    "GuiSettings",
    "InvalidToolArgumentsError",
    "LLMSettings",
    "ModelError",
    "ModelPrice",
    "Planner",
    "PlannerNotFoundError",
    "PlannerOutput",
    "PlannerRegistry",
    "PriceTable",
    "SandboxSettings",
    "SandboxTools",
    "SessionContext",
    "ToolCancelledError",
    "ToolDeniedError",
    "ToolError",
    "ToolExecutionError",
    "ToolProvider",
    "ToolTimeoutError",
    "ToolUnavailableError",
    "UnknownToolError",
    "__version__",
    "sandbox_provider",
    "workspace_provider",
]
