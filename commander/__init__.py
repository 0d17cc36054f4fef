"""The commander: runs LLM agent planners for the dispatcher over gRPC ChatStreams.

The public surface is what ``__all__`` lists; everything else (modules with a
leading underscore, ``commander._gen``) may change without notice.
"""

from commander._chat import ChatPlanner, LLMSettings
from commander._commander import VERSION as __version__
from commander._commander import Commander
from commander._connection import ConnectionConfig
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
from commander._planners import Planner, PlannerOutput, PlannerRegistry
from commander._provider import ToolProvider
from commander._session import SessionContext
from commander._workspace import workspace_provider

__all__ = [
    "ChatPlanner",
    "Commander",
    "CommanderError",
    "ConnectionConfig",
    "InvalidToolArgumentsError",
    "LLMSettings",
    "ModelError",
    "Planner",
    "PlannerNotFoundError",
    "PlannerOutput",
    "PlannerRegistry",
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
    "workspace_provider",
]
