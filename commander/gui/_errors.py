"""The one exception the parser raises, and the guard that makes it the only one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from commander._errors import CommanderError

_FRAGMENT_MAX = 120

_log = logging.getLogger("commander.gui")

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _clip(text: str, limit: int = _FRAGMENT_MAX) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _storable(text: str) -> str:
    """``text`` with lone surrogates and NUL escaped, so that it always encodes as UTF-8
    and fits a protobuf string and a PostgreSQL text column."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class ParseError(CommanderError):
    """The model's output is not an action this parser accepts.

    ``str(error)`` is written for the model: it says what was wrong and how to
    write it instead, so a planner can send it back verbatim as the next
    observation (see :meth:`feedback`). Nothing in the output was executed.
    The message is always valid UTF-8 without NUL, whatever the output held.
    """

    code = "parse_error"

    def __init__(self, message: str, *, fragment: str | None = None) -> None:
        if fragment:
            message = f"{message} (at: {_clip(fragment)!r})"
        message = _storable(message)
        super().__init__(message)
        self.message = message
        self.fragment = fragment

    def feedback(self) -> str:
        """The text to give the model as the result of its unusable step."""
        return (
            f"Your last output could not be used: {self.message}. "
            "Nothing was executed. Reply again in the required format, with one action call "
            "per line whose arguments are plain literals (quoted strings, numbers)."
        )


def guarded(parse: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """Calls ``parse``; any exception other than :class:`ParseError` becomes one.

    The parsers are written to raise only :class:`ParseError`, and the property
    tests hold them to that (the original exception is this error's
    ``__cause__``, which they check is absent). This is the backstop at the
    public entry points: whatever a model writes, the caller sees one error
    type and feeds it back, never a crash of the step loop.
    """
    try:
        return parse(*args, **kwargs)
    except ParseError:
        raise
    except Exception as exc:  # the backstop; logged as the parser bug it is
        _log.warning("the GUI parser failed unexpectedly on model output", exc_info=True)
        raise ParseError(
            f"the output could not be read ({type(exc).__name__}); "
            "write one action with plain literal arguments"
        ) from exc
