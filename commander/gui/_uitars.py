"""UI-TARS / Doubao UI-TARS output: ``Thought: …`` then ``Action: click(…)``.

The action section holds one call per line::

    Thought: The search box is at the top.
    Action: click(point='<point>512 64</point>')
    type(content='weather in Paris\\n')

A small scanner splits the section into calls (it knows string literals, so a
``)`` or a newline inside quotes does not end a call, and it turns raw newlines
inside quotes into ``\\n`` as UI-TARS' own parser does); each call is then read
by :mod:`commander.gui._literal`, which accepts literals only. UI-TARS often
leaves an apostrophe unescaped (``type(content='It's a test')``); when the strict
reading is not valid Python, a second reading takes a quote inside a ``'…'``
string that is not followed by ``,``, ``)``, ``]``, a quote or the end of a line
as a literal apostrophe, and is used only if all of it is good; otherwise the
strict reading's error stands. The scanner is linear, and each call is parsed,
whitelisted and mapped before the next is read. Arguments follow
the UI-TARS action space: ``point``/``start_box``, ``start_point``/``end_point``
or ``start_box``/``end_box``, ``key``, ``content``, ``direction``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

from commander.gui import _actions as act
from commander.gui._common import (
    MAX_ACTIONS,
    MAX_WAIT_MS,
    ParsedOutput,
    as_text,
    check_size,
    typed_text,
)
from commander.gui._coords import CoordinateSpace, Relative1000, ScreenSize, to_screen
from commander.gui._errors import ParseError, guarded
from commander.gui._keys import combo_to_xdotool, key_to_xdotool, split_combo
from commander.gui._literal import MAX_SOURCE, Call, Value, call_from_node, parse_expression

_HEADER = re.compile(r"^[ \t]*(Thought|Reflection|Action_Summary|Action)[ \t]*:[ \t]*", re.M)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Inside a string: characters copied as they are (one class, so it cannot backtrack).
_PLAIN = re.compile(r"[^'\"\\\r\n]+")
_BARE_CALL = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*\(")

_N = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_POINT_TAG = re.compile(rf"<point>\s*({_N})[\s,]+({_N})\s*</point>")
_BBOX_TAG = re.compile(rf"<bbox>\s*({_N})[\s,]+({_N})[\s,]+({_N})[\s,]+({_N})\s*</bbox>")
_TUPLE = re.compile(
    rf"(?:<\|box_start\|>)?\s*[(\[]?\s*({_N})\s*,\s*({_N})"
    rf"(?:\s*,\s*({_N})\s*,\s*({_N}))?\s*[)\]]?\s*(?:<\|box_end\|>)?"
)

_COORD_HELP = (
    "write a point as '<point>x y</point>' or a box as '<|box_start|>(x1,y1,x2,y2)<|box_end|>'"
)

_MAX_BOX_TEXT = 200


def split_sections(text: str) -> tuple[str, str, str]:
    """Returns (thought, reflection, action section); thought and reflection may be empty.

    The thought is the ``Thought:`` section, else the ``Action_Summary:`` one (UI-TARS'
    reflection format: ``Reflection: …`` / ``Action_Summary: …`` / ``Action: …``).
    """
    headers = list(_HEADER.finditer(text))
    action_at = next((m for m in headers if m.group(1) == "Action"), None)
    if action_at is None:
        if _BARE_CALL.match(text):
            return "", "", text.strip()
        raise ParseError(
            "no 'Action:' line found; end your answer with a line like "
            "\"Action: click(point='<point>100 200</point>')\""
        )
    sections: dict[str, str] = {}
    for m, after in itertools.pairwise(headers):
        if m is action_at:
            break
        sections.setdefault(m.group(1), text[m.end() : after.start()].strip())
    thought = sections.get("Thought") or sections.get("Action_Summary", "")
    return thought, sections.get("Reflection", ""), text[action_at.end() :].strip()


def _closes(section: str, k: int) -> bool:
    """Whether the quote at ``section[k]`` can end a string argument: what follows it,
    after blanks, is ``,``, ``)``, ``]``, a quote (implicit concatenation), a line
    break or the end."""
    n = len(section)
    k += 1
    while k < n and section[k] in " \t":
        k += 1
    return k >= n or section[k] in ",)]'\"\r\n"


def _scan_string(
    section: str, i: int, out: list[str], *, apostrophes: bool = False, stop: int | None = None
) -> int:
    """Copies the string literal starting at ``section[i]`` into ``out``; returns its end.

    With ``apostrophes``, a ``'`` inside a ``'…'`` string that cannot end it
    (:func:`_closes`) is copied escaped, as a literal apostrophe. A string still
    open at ``stop`` makes its action too long.
    """
    quote = section[i]
    delim = quote * 3 if section.startswith(quote * 3, i) else quote
    out.append(delim)
    k = i + len(delim)
    n = len(section)
    tolerant = apostrophes and delim == "'"
    if stop is not None:
        n = min(n, stop)
    while k < n:
        plain = _PLAIN.match(section, k, n)  # a run of ordinary characters, copied at once
        if plain is not None:
            out.append(plain.group(0))
            k = plain.end()
            continue
        if section.startswith(delim, k):
            if tolerant and not _closes(section, k):
                out.append("\\'")
                k += 1
                continue
            out.append(delim)
            return k + len(delim)
        c = section[k]
        if c == "\\" and k + 1 < n:
            out.append(section[k : k + 2])
            k += 2
            continue
        if len(delim) == 1 and c == "\n":
            out.append("\\n")  # UI-TARS writes real newlines inside content
        elif len(delim) == 1 and c == "\r":
            out.append("\\r")
        else:
            out.append(c)
        k += 1
    if n < len(section):
        raise ParseError(f"an action may be at most {MAX_SOURCE} characters long")
    raise ParseError(
        "unterminated string literal: close every quote, and inside text escape quotes as \\' "
        "and newlines as \\n",
        fragment=section[i : i + 60],
    )


def split_calls(section: str, *, apostrophes: bool = False) -> list[str]:
    """Splits an action section into call sources, one call per line (linear: each
    character is looked at once; see :func:`_scan_string` for ``apostrophes``)."""
    calls: list[str] = []
    i, n = 0, len(section)
    while True:
        while i < n and section[i].isspace():
            i += 1
        if i >= n:
            return calls
        if len(calls) >= MAX_ACTIONS:
            raise ParseError(f"at most {MAX_ACTIONS} actions are accepted in one answer")
        m = _IDENT.match(section, i)
        if m is None:
            raise ParseError("expected an action call such as click(...)", fragment=section[i:])
        k = m.end()
        while k < n and section[k] in " \t":
            k += 1
        if k >= n or section[k] != "(":
            raise ParseError(f"expected '(' after {m.group(0)!r}", fragment=section[i:])
        out = [m.group(0)]
        # The source grows from here (the name, then section[k:]), never shrinks: past
        # MAX_SOURCE characters parse_expression would refuse it, so stop reading there.
        stop = k - len(m.group(0)) + MAX_SOURCE + 1
        depth = 0
        while True:
            if k >= n:
                raise ParseError("missing ')' at the end of the action", fragment=section[i:])
            if k >= stop:
                raise ParseError(f"an action may be at most {MAX_SOURCE} characters long")
            c = section[k]
            if c in "'\"":
                k = _scan_string(section, k, out, apostrophes=apostrophes, stop=stop)
                continue
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            out.append(c)
            k += 1
            if depth == 0:
                break
        calls.append("".join(out))
        while k < n and section[k] in " \t":
            k += 1
        if k < n and section[k] not in "\r\n":
            raise ParseError(
                "unexpected text after the action; write one action call per line",
                fragment=section[k:],
            )
        i = k


def parse_box(value: Value, screen: ScreenSize, space: CoordinateSpace) -> act.Point:
    """A point or box argument to a screen pixel (a box becomes its centre)."""
    numbers: list[float]
    if isinstance(value, tuple):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ParseError(f"coordinates must be numbers; {_COORD_HELP}")
        numbers = [float(v) for v in value]  # type: ignore[arg-type]
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_BOX_TEXT:
            raise ParseError(f"coordinate text is too long; {_COORD_HELP}")
        m = _POINT_TAG.fullmatch(text) or _BBOX_TAG.fullmatch(text) or _TUPLE.fullmatch(text)
        if m is None:
            raise ParseError(f"cannot read coordinates; {_COORD_HELP}", fragment=text)
        numbers = [float(g) for g in m.groups() if g is not None]
    else:
        raise ParseError(f"coordinates must be a quoted string; {_COORD_HELP}")
    if len(numbers) == 4:
        x1, y1, x2, y2 = numbers
        numbers = [(x1 + x2) / 2, (y1 + y2) / 2]
    if len(numbers) != 2:
        raise ParseError(f"a point has 2 numbers and a box 4, got {len(numbers)}; {_COORD_HELP}")
    x, y = to_screen(numbers[0], numbers[1], screen=screen, space=space)
    return act.Point(x, y)


class _Context:
    def __init__(self, screen: ScreenSize, space: CoordinateSpace, scroll_steps: int, wait_ms: int):
        self.screen = screen
        self.space = space
        self.scroll_steps = scroll_steps
        self.wait_ms = wait_ms


# Argument aliases the UI-TARS versions use interchangeably.
_ALIASES = {"point": "start_box", "start_point": "start_box", "end_point": "end_box"}


def _args(call: Call, allowed: tuple[str, ...], example: str) -> dict[str, Value]:
    if call.args:
        raise ParseError(f"{call.func}() takes keyword arguments only; e.g. {example}")
    out: dict[str, Value] = {}
    for key, value in call.kwargs.items():
        canon = _ALIASES.get(key, key)
        if canon not in allowed:
            raise ParseError(f"{call.func}() got an unexpected argument {key!r}; e.g. {example}")
        if canon in out:
            raise ParseError(f"{call.func}() got the same argument twice ({key!r})")
        out[canon] = value
    return out


def _need(args: dict[str, Value], key: str, call: Call, example: str) -> Value:
    if key not in args or args[key] in ("", None):
        raise ParseError(f"{call.func}() needs {key!r}; e.g. {example}")
    return args[key]


def _click(
    cls: type[act.MouseClick] | type[act.MouseDoubleClick], button: act.MouseButton
) -> Callable[[Call, _Context], list[act.Action]]:
    def handler(call: Call, ctx: _Context) -> list[act.Action]:
        ex = f"{call.func}(point='<point>x y</point>')"
        args = _args(call, ("start_box",), ex)
        at = parse_box(_need(args, "start_box", call, ex), ctx.screen, ctx.space)
        return [cls(at=at, button=button)]

    return handler


def _hover(call: Call, ctx: _Context) -> list[act.Action]:
    ex = f"{call.func}(point='<point>x y</point>')"
    args = _args(call, ("start_box",), ex)
    return [act.MouseMove(to=parse_box(_need(args, "start_box", call, ex), ctx.screen, ctx.space))]


def _drag(call: Call, ctx: _Context) -> list[act.Action]:
    ex = "drag(start_point='<point>x1 y1</point>', end_point='<point>x2 y2</point>')"
    args = _args(call, ("start_box", "end_box"), ex)
    start = parse_box(_need(args, "start_box", call, ex), ctx.screen, ctx.space)
    end = parse_box(_need(args, "end_box", call, ex), ctx.screen, ctx.space)
    return [act.MouseDrag(start=start, end=end)]


def _keys_arg(call: Call, example: str) -> list[str]:
    args = _args(call, ("key", "hotkey"), example)
    if "key" in args and "hotkey" in args:
        raise ParseError(f"{call.func}() takes 'key' once; e.g. {example}")
    raw = args.get("key", args.get("hotkey"))
    if raw in ("", None):
        raise ParseError(f"{call.func}() needs 'key'; e.g. {example}")
    keys = split_combo(as_text(raw, "key", limit=100))
    if not keys:
        raise ParseError(f"{call.func}() needs at least one key; e.g. {example}")
    return keys


def _hotkey(call: Call, ctx: _Context) -> list[act.Action]:
    keys = _keys_arg(call, "hotkey(key='ctrl c')")
    return [act.KeyboardHotkey(keys=combo_to_xdotool(keys))]


def _key_down(call: Call, ctx: _Context) -> list[act.Action]:
    # UI-TARS' reference implementations treat press like keydown (hold the key).
    keys = _keys_arg(call, f"{call.func}(key='shift')")
    return [act.KeyDown(key=key_to_xdotool(k)) for k in keys]


def _key_up(call: Call, ctx: _Context) -> list[act.Action]:
    keys = _keys_arg(call, f"{call.func}(key='shift')")
    return [act.KeyUp(key=key_to_xdotool(k)) for k in keys]


def _type(call: Call, ctx: _Context) -> list[act.Action]:
    ex = "type(content='hello\\n')"
    args = _args(call, ("content",), ex)
    if "content" not in args:
        raise ParseError(f"type() needs 'content'; e.g. {ex}")
    return [act.KeyboardType(content=typed_text(args["content"], "content"))]


_DIRECTIONS = {"down": (1, 0), "up": (-1, 0), "right": (0, 1), "left": (0, -1)}


def _scroll(call: Call, ctx: _Context) -> list[act.Action]:
    ex = "scroll(point='<point>x y</point>', direction='down')"
    args = _args(call, ("start_box", "direction"), ex)
    direction = as_text(_need(args, "direction", call, ex), "direction", limit=20)
    step = _DIRECTIONS.get(direction.strip().lower())
    if step is None:
        raise ParseError(f"direction must be one of up, down, left, right; got {direction!r}")
    box = args.get("start_box")
    at = act.HERE if box in ("", None) else parse_box(box, ctx.screen, ctx.space)
    return [
        act.MouseScroll(
            at=at,
            step_vertical=step[0] * ctx.scroll_steps,
            step_horizontal=step[1] * ctx.scroll_steps,
        )
    ]


def _wait(call: Call, ctx: _Context) -> list[act.Action]:
    _args(call, (), "wait()")
    return [act.Wait(duration_ms=ctx.wait_ms)]


def _finished(call: Call, ctx: _Context) -> list[act.Action]:
    ex = "finished(content='the answer')"
    args = _args(call, ("content",), ex)
    content = args.get("content")
    return [act.Finished(message=None if content is None else typed_text(content, "content"))]


def _call_user(call: Call, ctx: _Context) -> list[act.Action]:
    _args(call, (), "call_user()")
    return [act.CallUser()]


_HANDLERS: dict[str, Callable[[Call, _Context], list[act.Action]]] = {
    "click": _click(act.MouseClick, act.MouseButton.LEFT),
    "left_single": _click(act.MouseClick, act.MouseButton.LEFT),
    "left_double": _click(act.MouseDoubleClick, act.MouseButton.LEFT),
    "right_single": _click(act.MouseClick, act.MouseButton.RIGHT),
    "hover": _hover,
    "mouse_move": _hover,
    "drag": _drag,
    "select": _drag,
    "hotkey": _hotkey,
    "press": _key_down,
    "keydown": _key_down,
    "release": _key_up,
    "keyup": _key_up,
    "type": _type,
    "scroll": _scroll,
    "wait": _wait,
    "finished": _finished,
    "call_user": _call_user,
}

ACTION_NAMES = tuple(_HANDLERS)


def parse_uitars(
    text: str,
    *,
    screen: ScreenSize,
    space: CoordinateSpace | None = None,
    scroll_steps: int = 5,
    wait_ms: int = 5000,
) -> ParsedOutput:
    """Parses a UI-TARS / Doubao UI-TARS answer into actions on ``screen``.

    ``space`` is the model's coordinate convention: :class:`Relative1000`
    (the default; UI-TARS 1.0, Doubao) or ``SmartResizedPixels()``
    (UI-TARS-1.5). ``scroll`` turns the wheel ``scroll_steps`` clicks;
    ``wait()`` waits ``wait_ms``. Raises :class:`ParseError` — with a message
    meant for the model — for anything outside the action space.
    """
    if not 1 <= scroll_steps <= 100 or not 0 <= wait_ms <= MAX_WAIT_MS:
        raise ValueError("scroll_steps must be within 1..100 and wait_ms within 0..60000")
    ctx = _Context(screen, space or Relative1000(), scroll_steps, wait_ms)
    return guarded(_parse, text, ctx)


class _Unreadable(Exception):
    """The section is not valid Python as read (carries the error for the model)."""

    def __init__(self, error: ParseError) -> None:
        super().__init__(error.message)
        self.error = error


def _split(section: str, *, apostrophes: bool) -> list[str]:
    try:
        sources = split_calls(section, apostrophes=apostrophes)
    except ParseError as exc:
        raise _Unreadable(exc) from None
    if not sources:
        raise ParseError(
            "the 'Action:' line is empty; write an action such as "
            "click(point='<point>100 200</point>')"
        )
    return sources


def _actions(sources: list[str], ctx: _Context) -> list[act.Action]:
    """The actions of the calls, call after call: each is parsed, whitelisted and
    mapped before the next is read, so a bad call ends the work at once. Syntax
    errors are raised as :class:`_Unreadable`, everything else as :class:`ParseError`."""
    actions: list[act.Action] = []
    for src in sources:
        try:
            expr = parse_expression(src)
        except ParseError as exc:
            raise _Unreadable(exc) from None
        call = call_from_node(expr)
        handler = _HANDLERS.get(call.func)
        if handler is None:
            raise ParseError(
                f"unknown action {call.func[:40]!r}; the actions are: " + ", ".join(ACTION_NAMES)
            )
        actions.extend(handler(call, ctx))
    return actions


def _tolerant(section: str, strict: list[str] | None, ctx: _Context) -> list[act.Action] | None:
    """The actions of the reading with literal apostrophes, or None if it is no
    different from the strict one or not wholly good."""
    if "'" not in section:
        return None
    try:
        sources = _split(section, apostrophes=True)
        return None if sources == strict else _actions(sources, ctx)
    except (_Unreadable, ParseError):
        return None


def _parse(text: str, ctx: _Context) -> ParsedOutput:
    check_size(text)
    thought, reflection, section = split_sections(text)
    strict_sources: list[str] | None = None
    try:
        strict_sources = _split(section, apostrophes=False)
        actions = _actions(strict_sources, ctx)
    except _Unreadable as strict:
        # UI-TARS leaves apostrophes unescaped: read again taking them literally, and
        # use that reading only if it differs and is wholly good; otherwise the strict
        # error stands. (So ast.parse sees at most twice what the section holds.)
        tolerant = _tolerant(section, strict_sources, ctx)
        if tolerant is None:
            raise strict.error from None
        actions = tolerant
    if len(actions) > MAX_ACTIONS:
        raise ParseError(f"at most {MAX_ACTIONS} actions are accepted in one answer")
    return ParsedOutput(
        thought=thought, actions=tuple(actions), action_text=section, reflection=reflection
    )
