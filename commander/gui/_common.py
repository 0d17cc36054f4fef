"""Pieces shared by the format parsers: the result type, limits, argument checks."""

from __future__ import annotations

import re
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
    #: UI-TARS' ``Reflection:`` section (on the previous step), when the model wrote one.
    reflection: str = ""


def check_size(text: str) -> None:
    if not isinstance(text, str):
        raise ParseError(f"model output must be text, got {type(text).__name__}")
    if len(text) > MAX_OUTPUT_CHARS:
        raise ParseError(
            f"the output is {len(text)} characters long; at most {MAX_OUTPUT_CHARS} are accepted"
        )
    if "\x00" in text:
        raise ParseError("the output contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParseError(
                f"the output contains an invalid character at {exc.start} (a lone surrogate)"
            ) from None


# Characters that may not be typed or reported: control characters other than
# \t and \n (C0, DEL, C1) and lone surrogates (not encodable as UTF-8: they
# would break the protobuf event and the store). A character class, so one
# linear scan.
_UNTYPABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# What may not be stored at all: NUL (PostgreSQL text) and lone surrogates.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def _refuse(m: re.Match[str], what: str, hint: str) -> ParseError:
    char = m.group(0)
    kind = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    return ParseError(f"{what} contains {kind} ({char!r} at {m.start()}); {hint}")


def typed_text(value: Value, what: str, *, limit: int = MAX_TEXT) -> str:
    """Text to type or report: a string of at most ``limit`` characters, without
    control characters other than ``\\n`` and ``\\t``, and without lone surrogates."""
    text = as_text(value, what, limit=limit)
    m = _UNTYPABLE.search(text)
    if m is not None:
        raise _refuse(m, what, "only printable text, \\n and \\t can be typed")
    return text


def storable_text(text: str, what: str) -> str:
    """Text kept as it is (a thought): refused only if it holds NUL or a lone surrogate."""
    m = _UNSTORABLE.search(text)
    if m is not None:
        raise _refuse(m, what, "write plain text")
    return text


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
