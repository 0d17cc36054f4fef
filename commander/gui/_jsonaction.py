"""JSON action output: one object ``{"thought", "action", "x", "y", "text"}``.

The format for models that cannot be trusted to write UI-TARS calls — small
text-only models in particular. Its JSON Schema (:data:`JSON_ACTION_SCHEMA`)
is sent as ``response_format: {"type": "json_object", "schema": …}``, which
llama-cpp-python's server turns into a grammar: the model cannot emit anything
else. The parser does not rely on that: it reads the text with ``json.loads``
(data only; no eval), refuses duplicate keys, NaN/Infinity, unknown keys and
unknown actions, and maps the fields onto the same typed actions as the other
formats::

    {"thought": "The terminal has focus.", "action": "type",
     "x": 0, "y": 0, "text": "hello\\n"}

``text`` is the content of ``type``, the keys of ``hotkey`` (``ctrl c`` or
``ctrl+c``), the direction of ``scroll`` and the answer of ``finished``;
``x``/``y`` are used by the pointer actions only.
"""

from __future__ import annotations

import json
from typing import Any

from commander.gui import _actions as act
from commander.gui._common import MAX_TEXT, ParsedOutput, check_size, storable_text, typed_text
from commander.gui._coords import CoordinateSpace, ScreenPixels, ScreenSize, to_screen
from commander.gui._errors import ParseError, guarded
from commander.gui._keys import combo_to_xdotool, split_combo

#: The actions of this format (also the schema's enum).
JSON_ACTIONS = (
    "type",
    "hotkey",
    "click",
    "double_click",
    "right_click",
    "move",
    "scroll",
    "wait",
    "finished",
    "failed",
    "call_user",
)
_POINTER = {"click", "double_click", "right_click", "move"}
_KEYS = ("thought", "action", "x", "y", "text")
_MAX_THOUGHT = 2000

#: The JSON Schema of one answer, for grammar-constrained decoding. Every key is
#: required so the grammar is small and the order fixed (a small model does best
#: with no choices beyond the values).
JSON_ACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "thought": {"type": "string", "maxLength": 300},
        "action": {"type": "string", "enum": list(JSON_ACTIONS)},
        "x": {"type": "integer"},
        "y": {"type": "integer"},
        "text": {"type": "string", "maxLength": 500},
    },
    "required": list(_KEYS),
}

#: Longest integer accepted (digits): json.loads would refuse > 4300 with a ValueError.
_MAX_INT_DIGITS = 15
_DIRECTIONS = {"down": (1, 0), "up": (-1, 0), "right": (0, 1), "left": (0, -1)}
_EXAMPLE = '{"thought": "…", "action": "type", "x": 0, "y": 0, "text": "hello\\n"}'


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ParseError(f"the key {key[:40]!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ParseError(f"{name} is not a number this format accepts")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
        raise ParseError(f"integers of more than {_MAX_INT_DIGITS} digits are not accepted")
    return int(digits)


def unfence(body: str) -> str:
    """The inside of a ```json fenced block that is all of ``body`` (stripped), else ``body``.

    A linear scan with the meaning of the regex
    ``^\\s*```(?:json)?\\s*\\n(.*?)\\n\\s*```\\s*$`` (re.S), which backtracked with cubic
    cost on a fence followed by many newlines: an opening fence, optionally ``json``,
    whitespace holding a newline; a closing fence at the end after whitespace holding a
    newline; the two newlines distinct.
    """
    if not body.startswith("```") or not body.endswith("```") or len(body) < 6:
        return body
    start = 7 if body.startswith("```json") else 3
    inner = body[start:-3]
    content = inner.strip()
    if not content:
        # All whitespace: it needs two newlines, one for each fence.
        return "" if inner.count("\n") >= 2 else body
    lead = inner[: len(inner) - len(inner.lstrip())]
    tail = inner[len(inner.rstrip()) :]
    if "\n" not in lead or "\n" not in tail:
        return body
    return content


def _string(obj: dict[str, Any], key: str, limit: int) -> str:
    value = obj.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ParseError(f'"{key}" must be a string, got {type(value).__name__}')
    if len(value) > limit:
        raise ParseError(f'"{key}" is {len(value)} characters long; at most {limit} are allowed')
    return value


def _coordinate(obj: dict[str, Any], key: str) -> float:
    if key not in obj:
        raise ParseError(f'the action {obj["action"]!r} needs "{key}"; e.g. {_EXAMPLE}')
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParseError(f'"{key}" must be a number, got {type(value).__name__}')
    return value


def parse_json_action(
    text: str,
    *,
    screen: ScreenSize,
    space: CoordinateSpace | None = None,
    scroll_steps: int = 5,
    wait_ms: int = 2000,
) -> ParsedOutput:
    """Parses one JSON action object into actions on ``screen``.

    ``space`` is the convention of ``x``/``y`` (screen pixels by default: the
    text observation gives window geometry in pixels). Raises
    :class:`ParseError`, with a message meant for the model, for anything else.
    """
    return guarded(
        _parse, text, screen=screen, space=space, scroll_steps=scroll_steps, wait_ms=wait_ms
    )


def _parse(
    text: str, *, screen: ScreenSize, space: CoordinateSpace | None, scroll_steps: int, wait_ms: int
) -> ParsedOutput:
    check_size(text)
    body = unfence(text.strip())
    try:
        obj = json.loads(
            body,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
        )
    except json.JSONDecodeError as exc:
        raise ParseError(
            f"the answer is not valid JSON ({exc.msg} at character {exc.pos}); "
            f"answer with one object like {_EXAMPLE}",
            fragment=body[max(0, exc.pos - 20) : exc.pos + 40],
        ) from None
    except RecursionError:
        raise ParseError("the answer is nested too deeply; answer with one flat object") from None
    if not isinstance(obj, dict):
        raise ParseError(f"the answer must be one JSON object like {_EXAMPLE}")
    unknown = [k for k in obj if k not in _KEYS]
    if unknown:
        raise ParseError(f"unknown key {unknown[0][:40]!r}; the keys are: {', '.join(_KEYS)}")
    action = obj.get("action")
    if not isinstance(action, str) or action not in JSON_ACTIONS:
        shown = action[:40] if isinstance(action, str) else type(action).__name__
        raise ParseError(f'"action" must be one of {", ".join(JSON_ACTIONS)}; got {shown!r}')
    thought = storable_text(_string(obj, "thought", _MAX_THOUGHT).strip(), '"thought"')
    value = _string(obj, "text", MAX_TEXT)
    space = space or ScreenPixels()

    def point() -> act.Point:
        x, y = to_screen(_coordinate(obj, "x"), _coordinate(obj, "y"), screen=screen, space=space)
        return act.Point(x, y)

    result: act.Action
    if action == "type":
        if not value:
            raise ParseError('"type" needs the text to type in "text"')
        result = act.KeyboardType(content=typed_text(value, '"text"'))
    elif action == "hotkey":
        if not value.strip():
            raise ParseError('"hotkey" needs the keys in "text", e.g. "ctrl c" or "enter"')
        result = act.KeyboardHotkey(keys=combo_to_xdotool(split_combo(value[:100])))
    elif action == "click":
        result = act.MouseClick(at=point())
    elif action == "double_click":
        result = act.MouseDoubleClick(at=point())
    elif action == "right_click":
        result = act.MouseClick(at=point(), button=act.MouseButton.RIGHT)
    elif action == "move":
        result = act.MouseMove(to=point())
    elif action == "scroll":
        step = _DIRECTIONS.get(value.strip().lower() or "down")
        if step is None:
            raise ParseError(f'"scroll" needs "text" up, down, left or right; got {value[:20]!r}')
        has_point = "x" in obj and "y" in obj and (obj["x"], obj["y"]) != (0, 0)
        result = act.MouseScroll(
            at=point() if has_point else act.HERE,
            step_vertical=step[0] * scroll_steps,
            step_horizontal=step[1] * scroll_steps,
        )
    elif action == "wait":
        result = act.Wait(duration_ms=wait_ms)
    elif action == "finished":
        result = act.Finished(message=typed_text(value, '"text"') or None)
    elif action == "failed":
        result = act.Failed(message=typed_text(value, '"text"') or None)
    else:
        result = act.CallUser()
    return ParsedOutput(thought=thought, actions=(result,), action_text=body)
