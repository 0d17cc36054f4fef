"""pyautogui-style code, as the ``lybic`` SDK's ``Pyautogui`` class accepts it.

Accepted statements, one action each (several per answer, on separate lines):
``pyautogui.click / doubleClick / tripleClick / rightClick / middleClick /
moveTo / move / dragTo / scroll / write / typewrite / press / hotkey /
keyDown / keyUp(...)`` with literal arguments and pyautogui's own signatures;
``import pyautogui`` / ``import time`` (ignored); ``time.sleep(seconds)``; and
the bare words ``WAIT``, ``DONE``, ``FAIL`` that OSWorld-style prompts use.
Code may sit in a fenced block (```python … ```); prose around it is the thought.
Everything else — assignments, loops, other modules, attribute access, nested
calls — is a :class:`ParseError`. The code is parsed, never run.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

from commander.gui import _actions as act
from commander.gui._common import (
    MAX_ACTIONS,
    MAX_SCROLL,
    MAX_WAIT_MS,
    ParsedOutput,
    as_int,
    as_number,
    as_text,
    bind,
    check_size,
    typed_text,
)
from commander.gui._coords import (
    CoordinateSpace,
    ScreenPixels,
    ScreenSize,
    offset_to_screen,
    to_screen,
)
from commander.gui._errors import ParseError, guarded
from commander.gui._keys import combo_to_xdotool, key_to_xdotool
from commander.gui._literal import MAX_SOURCE, Call, Value, call_from_node, parse_module

_BACKTICKS = re.compile("`+")
#: The languages an opening fence may name (matched case-insensitively, longest first).
_FENCE_LANGS = ("python3", "python", "py")
# Applied to one line at a time; the possessive \s*+ cannot backtrack, and every
# alternative starts with a non-space character, so it means what \s* meant.
_CODE_LINE = re.compile(r"^\s*+(?:pyautogui\.|import\s|time\.sleep\(|(?:WAIT|DONE|FAIL)\s*$)")
_MODULES = frozenset({"pyautogui", "time"})
_IGNORED = ("duration", "tween", "logScreenshot", "_pause", "interval")

#: Most presses one press() may ask for.
_MAX_PRESSES = 50


class _Ctx:
    def __init__(self, screen: ScreenSize, space: CoordinateSpace):
        self.screen = screen
        self.space = space

    def point(self, x: Value, y: Value, func: str) -> act.Point:
        """pyautogui's (x, y) convention: both None = where the pointer is; (x, y) tuple."""
        if isinstance(x, tuple) and y is None:
            if len(x) != 2:
                raise ParseError(f"{func}() needs a point as (x, y)")
            x, y = x
        if x is None and y is None:
            return act.HERE
        if isinstance(x, str):
            raise ParseError(
                f"{func}(): locating an image on screen is not supported; give x and y"
            )
        if x is None or y is None:
            raise ParseError(f"{func}() needs both x and y (or neither, for the current position)")
        px, py = to_screen(
            as_number(x, "x"), as_number(y, "y"), screen=self.screen, space=self.space
        )
        return act.Point(px, py)


def _button(value: Value, func: str) -> act.MouseButton:
    names = {
        "left": act.MouseButton.LEFT,
        "primary": act.MouseButton.LEFT,
        "right": act.MouseButton.RIGHT,
        "secondary": act.MouseButton.RIGHT,
        "middle": act.MouseButton.MIDDLE,
    }
    numbers = {1: act.MouseButton.LEFT, 2: act.MouseButton.MIDDLE, 3: act.MouseButton.RIGHT}
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in numbers:
        return numbers[value]
    raise ParseError(f"{func}(): button must be 'left', 'right' or 'middle', got {value!r}"[:120])


def _check_ignored(bound: dict[str, Value], func: str) -> None:
    # Timing arguments are accepted for compatibility and ignored, but must be plain values.
    for key in _IGNORED:
        value = bound.get(key)
        if value is not None and not isinstance(value, int | float | bool):
            raise ParseError(f"{func}(): {key} must be a number")


def _args(call: Call, params: str, example: str) -> dict[str, Value]:
    """pyautogui's binding of ``call``'s arguments to ``params`` (its signature, in order);
    the timing arguments it ignores are checked too."""
    name = call.func.removeprefix("pyautogui.")
    bound = bind(call, name, tuple(params.split()), example=example)
    _check_ignored(bound, name)
    return bound


def _clicks(n: int, at: act.Point, button: act.MouseButton) -> act.Action:
    if n == 1:
        return act.MouseClick(at=at, button=button)
    if n == 2:
        return act.MouseDoubleClick(at=at, button=button)
    return act.MouseTripleClick(at=at, button=button)


def _click(call: Call, ctx: _Ctx) -> list[act.Action]:
    params = "x y clicks interval button duration tween logScreenshot _pause"
    b = _args(call, params, "pyautogui.click(100, 200)")
    clicks = 1 if b.get("clicks") is None else as_int(b["clicks"], "clicks", 1, 3)
    button = act.MouseButton.LEFT if b.get("button") is None else _button(b["button"], "click")
    return [_clicks(clicks, ctx.point(b.get("x"), b.get("y"), "click"), button)]


def _fixed_clicks(
    n: int, button: act.MouseButton | None
) -> Callable[[Call, _Ctx], list[act.Action]]:
    def handler(call: Call, ctx: _Ctx) -> list[act.Action]:
        name = call.func.removeprefix("pyautogui.")
        button_param = "button" if button is None else ""  # rightClick, middleClick: none
        params = f"x y interval {button_param} duration tween logScreenshot _pause"
        b = _args(call, params, f"pyautogui.{name}(100, 200)")
        btn = button or (
            act.MouseButton.LEFT if b.get("button") is None else _button(b["button"], name)
        )
        return [_clicks(n, ctx.point(b.get("x"), b.get("y"), name), btn)]

    return handler


def _move_to(call: Call, ctx: _Ctx) -> list[act.Action]:
    b = _args(call, "x y duration tween logScreenshot _pause", "pyautogui.moveTo(100, 200)")
    return [act.MouseMove(to=ctx.point(b.get("x"), b.get("y"), "moveTo"))]


def _move(call: Call, ctx: _Ctx) -> list[act.Action]:
    name = call.func.removeprefix("pyautogui.")
    params = "xOffset yOffset duration tween logScreenshot _pause"
    b = _args(call, params, f"pyautogui.{name}(10, -20)")
    dx_raw, dy_raw = b.get("xOffset"), b.get("yOffset")
    if isinstance(dx_raw, tuple) and dy_raw is None and len(dx_raw) == 2:
        dx_raw, dy_raw = dx_raw
    dx = 0 if dx_raw is None else as_number(dx_raw, "xOffset")
    dy = 0 if dy_raw is None else as_number(dy_raw, "yOffset")
    px, py = offset_to_screen(dx, dy, screen=ctx.screen, space=ctx.space)
    return [act.MouseMove(to=act.Point(px, py, relative=True))]


def _drag_to(call: Call, ctx: _Ctx) -> list[act.Action]:
    params = "x y duration tween button logScreenshot _pause mouseDownUp"
    b = _args(call, params, "pyautogui.dragTo(300, 400)")
    if b.get("mouseDownUp") is False:
        raise ParseError("dragTo(): mouseDownUp=False is not supported")
    end = ctx.point(b.get("x"), b.get("y"), "dragTo")
    if end.relative:
        raise ParseError("dragTo() needs the x and y to drag to")
    button = act.MouseButton.LEFT if b.get("button") is None else _button(b["button"], "dragTo")
    return [act.MouseDrag(start=act.HERE, end=end, button=button)]


def _scroll(call: Call, ctx: _Ctx) -> list[act.Action]:
    b = _args(call, "clicks x y logScreenshot _pause", "pyautogui.scroll(-5, x=500, y=400)")
    if b.get("clicks") is None:
        raise ParseError("scroll() needs clicks: positive scrolls up, negative down")
    clicks = as_int(b["clicks"], "clicks", -MAX_SCROLL, MAX_SCROLL)
    # pyautogui: positive is up. The SDK: positive stepVertical is down.
    return [act.MouseScroll(at=ctx.point(b.get("x"), b.get("y"), "scroll"), step_vertical=-clicks)]


def _write(call: Call, ctx: _Ctx) -> list[act.Action]:
    name = call.func.removeprefix("pyautogui.")
    b = _args(call, "message interval logScreenshot _pause", f"pyautogui.{name}('hello')")
    message = b.get("message")
    if isinstance(message, str):
        return [act.KeyboardType(content=typed_text(message, "message"))]
    if not isinstance(message, tuple):
        raise ParseError(f"{name}() needs a message: a string or a list of keys")
    # A list mixes characters to type and key names to press, in order.
    out: list[act.Action] = []
    run: list[str] = []
    for item in message:
        item_text = as_text(item, "each item of the message list", limit=40)
        if len(item_text) == 1:
            run.append(item_text)
            continue
        if run:
            out.append(act.KeyboardType(content=typed_text("".join(run), "message")))
            run = []
        out.append(act.KeyboardHotkey(keys=key_to_xdotool(item_text)))
    if run:
        out.append(act.KeyboardType(content=typed_text("".join(run), "message")))
    return out


def _press(call: Call, ctx: _Ctx) -> list[act.Action]:
    b = _args(call, "keys presses interval logScreenshot _pause", "pyautogui.press('enter')")
    raw = b.get("keys")
    keys = list(raw) if isinstance(raw, tuple) else [raw]
    if not keys or raw is None:
        raise ParseError("press() needs a key name, e.g. pyautogui.press('enter')")
    presses = 1 if b.get("presses") is None else as_int(b["presses"], "presses", 1, _MAX_PRESSES)
    syms = [key_to_xdotool(as_text(k, "key", limit=40)) for k in keys]
    if len(syms) * presses > MAX_ACTIONS:
        raise ParseError(f"press() may press at most {MAX_ACTIONS} keys in one call")
    return [act.KeyboardHotkey(keys=s) for _ in range(presses) for s in syms]


def _hotkey(call: Call, ctx: _Ctx) -> list[act.Action]:
    unknown = set(call.kwargs) - {"interval", "logScreenshot", "_pause"}
    if unknown:
        raise ParseError(f"hotkey() got an unexpected argument {sorted(unknown)[0]!r}")
    _check_ignored(call.kwargs, "hotkey")
    args = call.args
    if len(args) == 1 and isinstance(args[0], tuple):
        args = args[0]
    keys = [as_text(k, "each key", limit=40) for k in args]
    return [act.KeyboardHotkey(keys=combo_to_xdotool(keys))]


def _key_down_up(
    cls: type[act.KeyDown] | type[act.KeyUp],
) -> Callable[[Call, _Ctx], list[act.Action]]:
    def handler(call: Call, ctx: _Ctx) -> list[act.Action]:
        name = call.func.removeprefix("pyautogui.")
        b = _args(call, "key logScreenshot _pause", f"pyautogui.{name}('shift')")
        if b.get("key") is None:
            raise ParseError(f"{name}() needs a key name")
        return [cls(key=key_to_xdotool(as_text(b["key"], "key", limit=40)))]

    return handler


def _sleep(call: Call, ctx: _Ctx) -> list[act.Action]:
    b = bind(call, "time.sleep", ("secs",), example="time.sleep(1)")
    if b.get("secs") is None:
        raise ParseError("time.sleep() needs the seconds to wait")
    secs = as_number(b["secs"], "seconds")
    if not 0 <= secs <= MAX_WAIT_MS / 1000:
        raise ParseError(f"time.sleep() may wait 0..{MAX_WAIT_MS // 1000} seconds, got {secs!r}")
    return [act.Wait(duration_ms=round(secs * 1000))]


def _position(call: Call, ctx: _Ctx) -> list[act.Action]:
    raise ParseError("position() performs no action; use moveTo, click, … with coordinates")


_HANDLERS: dict[str, Callable[[Call, _Ctx], list[act.Action]]] = {
    "pyautogui.click": _click,
    "pyautogui.doubleClick": _fixed_clicks(2, None),
    "pyautogui.tripleClick": _fixed_clicks(3, None),
    "pyautogui.rightClick": _fixed_clicks(1, act.MouseButton.RIGHT),
    "pyautogui.middleClick": _fixed_clicks(1, act.MouseButton.MIDDLE),
    "pyautogui.moveTo": _move_to,
    "pyautogui.move": _move,
    "pyautogui.moveRel": _move,
    "pyautogui.dragTo": _drag_to,
    "pyautogui.scroll": _scroll,
    "pyautogui.write": _write,
    "pyautogui.typewrite": _write,
    "pyautogui.press": _press,
    "pyautogui.hotkey": _hotkey,
    "pyautogui.keyDown": _key_down_up(act.KeyDown),
    "pyautogui.keyUp": _key_down_up(act.KeyUp),
    "pyautogui.position": _position,
    "time.sleep": _sleep,
}

FUNCTION_NAMES = tuple(
    n.removeprefix("pyautogui.") for n in _HANDLERS if n.startswith("pyautogui.")
)

_WORDS: dict[str, Callable[[], act.Action]] = {
    "WAIT": lambda: act.Wait(duration_ms=5000),
    "DONE": lambda: act.Finished(),
    "FAIL": lambda: act.Failed(),
}


def _fence_header_end(text: str, i: int) -> int:
    """Reads an opening fence's header from ``text[i]`` (just after the backticks):
    blanks, an optional language, blanks, a line break. Returns the index after the
    line break, or -1 if this is no opening fence."""
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    for lang in _FENCE_LANGS:
        if text[i : i + len(lang)].lower() == lang:
            i += len(lang)
            break
    while i < n and text[i] in " \t":
        i += 1
    if text.startswith("\r\n", i):
        return i + 2
    if text.startswith("\n", i):
        return i + 1
    return -1


def split_fences(text: str) -> tuple[list[str], str]:
    r"""The fenced code blocks of ``text`` and the text around them, in one linear scan.

    It means what ``findall`` / ``sub`` of the former pattern
    ``r"```[ \t]*(?:python3?|py)?[ \t]*\r?\n(.*?)```"`` (re.S | re.I) meant, without
    that pattern's backtracking between its two ``[ \t]*`` (quadratic on a fence
    followed by many blanks). Each character is looked at a bounded number of times:
    a header scan covers only blanks and a language name, which hold no backtick, so
    the next fence found lies beyond it.
    """
    blocks: list[str] = []
    prose: list[str] = []
    kept = pos = 0
    while (start := text.find("```", pos)) >= 0:
        run = _BACKTICKS.match(text, start)
        run_end = run.end() if run is not None else start
        if run_end - start > 3:
            # In a run of backticks only the last three can open a fence (a header
            # holds no backtick): go there at once rather than one backtick at a time.
            start = run_end - 3
        body = _fence_header_end(text, start + 3)
        if body < 0:
            pos = start + 1
            continue
        end = text.find("```", body)
        if end < 0:
            break  # no closing fence anywhere after: no later fence can close either
        blocks.append(text[body:end])
        prose.append(text[kept:start])
        kept = pos = end + 3
    prose.append(text[kept:])
    return blocks, "".join(prose)


def _common_prefix(a: str, b: str) -> str:
    i, n = 0, min(len(a), len(b))
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def dedent(text: str) -> str:
    """:func:`textwrap.dedent`, in one linear pass: blank lines (spaces and tabs only)
    become empty and the longest common leading blanks of the other lines are removed.
    (``textwrap.dedent`` compiles a regex from that margin: a 64,000-blank indent took
    over 100 ms, each time the margin differed.)"""
    lines = text.split("\n")
    margin: str | None = None
    for i, line in enumerate(lines):
        rest = line.lstrip(" \t")
        if not rest:
            lines[i] = ""
            continue
        indent = line[: len(line) - len(rest)]
        if margin is None:
            margin = indent
        elif not indent.startswith(margin):
            margin = _common_prefix(margin, indent)
    if margin:
        lines = [line[len(margin) :] for line in lines]
    return "\n".join(lines)


def _extract(text: str) -> tuple[str, str, ast.Module | None]:
    """(thought, code, the code's syntax tree if it was already parsed)."""
    blocks, prose = split_fences(text)
    if blocks:
        code = "\n".join(dedent(b) for b in blocks)
        return prose.strip(), code, None
    if "```" in text:
        raise ParseError("unterminated ``` code block")
    stripped = dedent(text).strip()
    if len(stripped) <= MAX_SOURCE:  # longer is no program we would accept as a whole
        try:
            tree = ast.parse(stripped, mode="exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            pass
        else:
            return "", stripped, tree
    lines = text.splitlines()
    code_lines = [ln.strip() for ln in lines if _CODE_LINE.match(ln)]
    prose_lines = [ln for ln in lines if not _CODE_LINE.match(ln)]
    return "\n".join(prose_lines).strip(), "\n".join(code_lines), None


def extract_code(text: str) -> tuple[str, str]:
    """Returns (thought, code): fenced blocks if any, else the text or its code lines."""
    thought, code, _ = _extract(text)
    return thought, code


def _statement(stmt: ast.stmt, ctx: _Ctx) -> list[act.Action]:
    where = f"line {stmt.lineno}"
    if isinstance(stmt, ast.Import):
        bad = [a.name for a in stmt.names if a.name not in _MODULES or a.asname]
        if bad:
            raise ParseError(
                f"{where}: importing {bad[0]!r} is not allowed; only pyautogui and time"
            )
        return []
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Name) and stmt.value.id in _WORDS:
        return [_WORDS[stmt.value.id]()]
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        try:
            call = call_from_node(stmt.value, _MODULES)
        except ParseError as exc:
            raise ParseError(f"{where}: {exc.message}") from None
        handler = _HANDLERS.get(call.func)
        if handler is None:
            raise ParseError(
                f"{where}: {call.func[:60]!r} is not an allowed function; use pyautogui."
                + ", pyautogui.".join(FUNCTION_NAMES)
            )
        try:
            return handler(call, ctx)
        except ParseError as exc:
            raise ParseError(f"{where}: {exc.message}") from None
    kind = type(stmt.value).__name__ if isinstance(stmt, ast.Expr) else type(stmt).__name__
    raise ParseError(
        f"{where}: {kind} statements are not allowed; write only pyautogui.<function>(...) "
        "calls with literal arguments, one per line"
    )


def parse_pyautogui(
    text: str, *, screen: ScreenSize, space: CoordinateSpace | None = None
) -> ParsedOutput:
    """Parses pyautogui-style code into actions on ``screen``.

    ``space`` is the convention of the coordinates in the code:
    :class:`ScreenPixels` (the default: the model saw the real screenshot),
    ``SmartResizedPixels()`` or ``Relative1000()``. Raises :class:`ParseError`
    with a message meant for the model.
    """
    return guarded(_parse, text, screen=screen, space=space)


def _parse(text: str, *, screen: ScreenSize, space: CoordinateSpace | None) -> ParsedOutput:
    check_size(text)
    ctx = _Ctx(screen, space or ScreenPixels())
    thought, code, tree = _extract(text)
    if not code.strip():
        raise ParseError("no pyautogui code found; write e.g. pyautogui.click(100, 200)")
    if tree is None:
        tree = parse_module(code)
    actions: list[act.Action] = []
    for stmt in tree.body:
        actions.extend(_statement(stmt, ctx))
        if len(actions) > MAX_ACTIONS:
            raise ParseError(f"at most {MAX_ACTIONS} actions are accepted in one answer")
    if not actions:
        raise ParseError("no action found; write e.g. pyautogui.click(100, 200)")
    return ParsedOutput(thought=thought, actions=tuple(actions), action_text=code)
