"""The package's exceptions: one root, a few meaningful subclasses.

Every error the commander raises on purpose is a :class:`CommanderError`; the
original cause is kept as ``__cause__`` (``raise ... from exc``) so nothing is
lost, while the message stays fit to show to a client (no secrets, no internal
paths beyond what the caller passed in).
"""

from __future__ import annotations

from typing import ClassVar

from commander._gen.dispatch.v1 import interaction_pb2
from commander._text import valid_text

_ToolErrorCode = interaction_pb2.ToolErrorCode


class CommanderError(Exception):
    """Root of every exception raised by the commander package."""

    #: Short machine-readable code, used as ``ErrorSignal.code`` when a planner
    #: fails with this exception.
    code: ClassVar[str] = "commander_error"


class PlannerNotFoundError(CommanderError):
    """A session asked for a planner that is not registered here."""

    code = "unknown_planner"


class ModelError(CommanderError):
    """The language model could not be reached or answered with an error."""

    code = "model_error"


class EndpointNotAllowedError(ModelError):
    """A task named a model endpoint the commander will not call (not on the
    allowlist, a link-local or metadata address, not an http(s) URL...); raised
    before any request is sent. The message starts ``model endpoint not allowed:``."""

    code = "model_endpoint_not_allowed"


class ToolError(CommanderError):
    """A brokered tool call failed; raised by ``SessionContext.call_tool``.

    Tool implementations served by a :class:`~commander.ToolProvider` may raise
    it too: the provider turns it into a tool result carrying :attr:`error_code`
    and the message.
    """

    code = "tool_error"
    #: The ``ToolErrorCode`` this class stands for.
    error_code: ClassVar[interaction_pb2.ToolErrorCode.ValueType] = (
        _ToolErrorCode.TOOL_ERROR_CODE_UNSPECIFIED
    )

    def __init__(self, message: str, *, tool_name: str = "", call_id: str = "") -> None:
        # Often built from an API's error body or a file name: it goes into a
        # protobuf message (a ToolError, an ErrorSignal), which must be UTF-8.
        message = valid_text(message)
        super().__init__(message)
        self.message = message
        self.tool_name = tool_name
        self.call_id = call_id


class UnknownToolError(ToolError):
    """No tool of that name is known to the dispatcher."""

    error_code = _ToolErrorCode.TOOL_ERROR_CODE_UNKNOWN_TOOL


class InvalidToolArgumentsError(ToolError):
    """The arguments were not a JSON object or failed the tool's schema."""

    error_code = _ToolErrorCode.TOOL_ERROR_CODE_INVALID_ARGUMENTS


class ToolTimeoutError(ToolError):
    """The tool did not answer within its timeout."""

    error_code = _ToolErrorCode.TOOL_ERROR_CODE_TIMEOUT


class ToolUnavailableError(ToolError):
    """The provider serving the tool went away mid-call."""

    error_code = _ToolErrorCode.TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE


class ToolExecutionError(ToolError):
    """The tool ran and failed."""

    error_code = _ToolErrorCode.TOOL_ERROR_CODE_EXECUTION_FAILED


class ToolDeniedError(ToolError):
    """A policy refused the call, or the session is stopped."""

    error_code = _ToolErrorCode.TOOL_ERROR_CODE_DENIED


class ToolCancelledError(ToolError):
    """The call was cancelled before it finished."""

    error_code = _ToolErrorCode.TOOL_ERROR_CODE_CANCELLED


_BY_CODE: dict[interaction_pb2.ToolErrorCode.ValueType, type[ToolError]] = {
    cls.error_code: cls
    for cls in (
        UnknownToolError,
        InvalidToolArgumentsError,
        ToolTimeoutError,
        ToolUnavailableError,
        ToolExecutionError,
        ToolDeniedError,
        ToolCancelledError,
    )
}


def tool_error_from_result(result: interaction_pb2.ToolCallResult) -> ToolError:
    """Build the typed exception for a ``ToolCallResult`` that carries an error."""
    cls = _BY_CODE.get(result.error.code, ToolError)
    message = result.error.message or tool_error_code_name(result.error.code)
    return cls(message, tool_name=result.tool_name, call_id=result.call_id)


def stop_code_name(code: int) -> str:
    """``STOP_CODE_CLIENT_CANCEL`` for 1; the number itself for codes this build does not know."""
    try:
        return interaction_pb2.StopCode.Name(interaction_pb2.StopCode.ValueType(code))
    except ValueError:
        return str(code)


def tool_error_code_name(code: int) -> str:
    """``TOOL_ERROR_CODE_TIMEOUT`` for 3; the number itself for codes this build does not know."""
    try:
        return _ToolErrorCode.Name(_ToolErrorCode.ValueType(code))
    except ValueError:
        return str(code)
