"""The one exception the parser raises."""

from __future__ import annotations

from commander._errors import CommanderError

_FRAGMENT_MAX = 120


def _clip(text: str, limit: int = _FRAGMENT_MAX) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ParseError(CommanderError):
    """The model's output is not an action this parser accepts.

    ``str(error)`` is written for the model: it says what was wrong and how to
    write it instead, so a planner can send it back verbatim as the next
    observation (see :meth:`feedback`). Nothing in the output was executed.
    """

    code = "parse_error"

    def __init__(self, message: str, *, fragment: str | None = None) -> None:
        if fragment:
            message = f"{message} (at: {_clip(fragment)!r})"
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
