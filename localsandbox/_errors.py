"""Errors of the local sandbox; the HTTP layer maps each to one status and code."""

from __future__ import annotations

from typing import ClassVar


class SandboxError(Exception):
    """Root of the local sandbox's errors. The message is safe to show to the client."""

    #: HTTP status the API answers with.
    status: ClassVar[int] = 500
    #: The ``code`` field of the JSON error body (Lybic's error shape).
    api_code: ClassVar[str] = "INTERNAL_ERROR"


class BadRequestError(SandboxError):
    """The request is well-formed JSON but asks for something invalid."""

    status = 400
    api_code = "BAD_REQUEST"


class UnsupportedActionError(BadRequestError):
    """An action this Linux desktop cannot perform (touch, android, os apps)."""

    api_code = "UNSUPPORTED_ACTION"


class NotFoundError(SandboxError):
    """No such sandbox (or it was deleted, or it expired)."""

    status = 404
    api_code = "NOT_FOUND"


class CapacityError(SandboxError):
    """The server already runs as many sandboxes as it may."""

    status = 429
    api_code = "TOO_MANY_SANDBOXES"


class ActionFailedError(SandboxError):
    """The input tool or the X server failed while performing an action."""

    status = 500
    api_code = "ACTION_FAILED"


class DisplayError(SandboxError):
    """The X server of a sandbox could not be started."""

    status = 503
    api_code = "DISPLAY_UNAVAILABLE"
