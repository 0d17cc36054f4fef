"""Pieces shared by the format parsers: the result type, limits, argument checks."""

from __future__ import annotations

from dataclasses import dataclass

from commander.gui._actions import Action
from commander.gui._errors import ParseError
from commander.gui._literal import Call, Value

#: Longest model output accepted at all; checked before any parsing.
MAX_OUTPUT_CHARS = 64_000
#: Most actions one output may carry.
MAX_ACTIONS = 32
#: Longest text one type/write action may carry.
MAX_TEXT = 10_000
#: Longest wait a model may ask for.
MAX_WAIT_MS = 60_000
#: Most wheel clicks one scroll may ask for.
MAX_SCROLL = 200


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """What a model said in one step: its reasoning and the actions to perform."""

    thought: str
    actions: tuple[Action, ...]
    #: The part of the output the actions were read from, for the conversation history.
    action_text: str


def check_size(text: str) -> None:
    if not isinstance(text, str):
        raise ParseError(f"model output must be text, got {type(text).__name__}")
    if len(text) > MAX_OUTPUT_CHARS:
        raise ParseError(
            f"the output is {len(text)} characters long; at most {MAX_OUTPUT_CHARS} are accepted"
        )
    if "\x00" in text:
        raise ParseError("the output contains a NUL character")


def bind(call: Call, name: str, params: tuple[str, ...], *, example: str) -> dict[str, Value]:
    """Python's argument binding for ``params`` (all optional), by position then keyword."""
    if len(call.args) > len(params):
        raise ParseError(
            f"{name}() takes at most {len(params)} positional arguments, "
            f"got {len(call.args)}; e.g. {example}"
        )
    bound: dict[str, Value] = dict(zip(params, call.args, strict=False))
    for key, value in call.kwargs.items():
        if key not in params:
            raise ParseError(f"{name}() got an unexpected argument {key!r}; e.g. {example}")
        if key in bound:
            raise ParseError(f"{name}() got argument {key!r} twice")
        bound[key] = value
    return bound


def as_text(value: Value, what: str, *, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ParseError(f"{what} must be a quoted string, got {_kind(value)}")
    if len(value) > limit:
        raise ParseError(f"{what} is {len(value)} characters long; at most {limit} are allowed")
    return value


def as_number(value: Value, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParseError(f"{what} must be a number, got {_kind(value)}")
    return value


def as_int(value: Value, what: str, lo: int, hi: int) -> int:
    number = as_number(value, what)
    if isinstance(number, float):
        if not number.is_integer():
            raise ParseError(f"{what} must be a whole number, got {number!r}")
        number = int(number)
    if not lo <= number <= hi:
        raise ParseError(f"{what} must be within {lo}..{hi}, got {number}")
    return number


def _kind(value: Value) -> str:
    if value is None:
        return "None"
    if isinstance(value, tuple):
        return "a list"
    return f"{type(value).__name__} {value!r}"[:60]
