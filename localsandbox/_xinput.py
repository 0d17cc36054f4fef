"""Action DTOs of the ``lybic`` SDK → xdotool command lines, and running them.

:func:`plan` is pure: it validates one action against the screen and returns
the xdotool argument lists that perform it. :func:`perform` runs them, each as
its own process (never through a shell), holding ``holdKey`` for the duration
and releasing it even when a step fails.

Client text reaches xdotool in two places only: key names, each checked by
:mod:`localsandbox._keys` and passed as one argument that cannot be read as an
xdotool command (``key a exec …`` would run a program), and typed text, passed
as one argument after ``--`` to ``type``, which reads every remaining argument
as text and never chains a command. xdotool also silently ignores key names it
does not know, so an unchecked typo would be a no-op reported as success.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

import anyio
from lybic import dto

from localsandbox._errors import (
    ActionFailedError,
    BadRequestError,
    UnsupportedActionError,
)
from localsandbox._keys import argument, combo_argument, key_parts

#: xdotool's wheel buttons: up, down, left, right.
_WHEEL = {"up": "4", "down": "5", "left": "6", "right": "7"}
#: SDK button flags → X button numbers.
_BUTTONS = {1: "1", 2: "3", 4: "2", 8: "8", 16: "9"}

TYPE_DELAY_MS = 8
MAX_TYPE_CHARS = 20_000
MAX_SCROLL_STEPS = 500
MAX_WAIT_MS = 60_000
MAX_HOTKEY_MS = 10_000
_CLICK_DELAY_MS = 60
_DRAG_PAUSE = "0.05"
_SHORT = 10.0

# The SDK's mobile actions; a desktop sandbox refuses them by name.
_MOBILE_PREFIXES = ("touch:", "android:", "os:")


@dataclass(frozen=True)
class Plan:
    """What one action does: xdotool invocations, optionally with keys held around them."""

    steps: list[list[str]] = field(default_factory=list)
    hold: list[str] = field(default_factory=list)
    wait_ms: int = 0
    timeout: float = 15.0


def _coord(length: Any, size: int, what: str, *, relative: bool) -> int:
    if isinstance(length, dto.PixelLength):
        value = int(length.value)
    elif isinstance(length, dto.FractionalLength):
        if length.denominator <= 0:
            raise BadRequestError(f"{what}: denominator must be positive")
        fraction: float = length.numerator / length.denominator
        if not relative:
            if not 0 <= fraction <= 1:
                raise BadRequestError(f"{what}: fraction {fraction:g} is outside 0..1")
            return min(size - 1, round(fraction * size))
        value = round(fraction * size)
    else:  # pragma: no cover - pydantic only builds the two
        raise BadRequestError(f"{what}: unknown length type")
    if relative:
        if abs(value) > size:
            raise BadRequestError(f"{what}: offset {value} is larger than the screen ({size} px)")
    elif not 0 <= value < size:
        raise BadRequestError(f"{what}: {value} px is outside the screen (0..{size - 1})")
    return value


def _move(x: Any, y: Any, relative: bool, width: int, height: int, label: str = "") -> list[str]:
    px = _coord(x, width, f"{label}x", relative=relative)
    py = _coord(y, height, f"{label}y", relative=relative)
    if relative:
        return ["mousemove_relative", "--", str(px), str(py)]
    return ["mousemove", str(px), str(py)]


def _keys_each(combo: str, what: str) -> list[str]:
    """``ctrl+shift`` → ``["ctrl", "shift"]``: checked keys, each one safe argument."""
    return [argument([p]) for p in key_parts(combo, what)]


def _combos(keys: str, what: str, limit: int = 16) -> list[str]:
    """A space-separated key sequence → one safe argument per combination."""
    combos = keys.split()
    if not combos:
        raise BadRequestError(f"{what}: no key given")
    if len(combos) > limit:
        raise BadRequestError(f"{what}: at most {limit} key combinations")
    return [combo_argument(c, what) for c in combos]


def _buttons(flags: int) -> list[str]:
    if not 0 < flags < 32:
        raise BadRequestError(f"button: {flags} is not a combination of 1, 2, 4, 8, 16")
    return [b for f, b in _BUTTONS.items() if flags & f]


def _hold(hold_key: str | None) -> list[str]:
    if not hold_key:
        return []
    return _keys_each(hold_key, "holdKey")


def _clicks(action: Any, count: int, width: int, height: int) -> Plan:
    move = _move(action.x, action.y, action.relative, width, height)
    buttons = _buttons(int(action.button))
    if len(buttons) == 1:
        press = ["click", "--repeat", str(count), "--delay", str(_CLICK_DELAY_MS), buttons[0]]
    else:
        press = []
        for _ in range(count):
            press += [w for b in buttons for w in ("mousedown", b)]
            press += [w for b in buttons for w in ("mouseup", b)]
    return Plan(steps=[move + press], hold=_hold(action.holdKey))


def plan(action: Any, width: int, height: int) -> Plan:
    """The xdotool steps for one SDK action on a ``width``x``height`` screen."""
    kind = getattr(action, "type", None)
    if isinstance(action, dto.MouseClickAction):
        return _clicks(action, 1, width, height)
    if isinstance(action, dto.MouseDoubleClickAction):
        return _clicks(action, 2, width, height)
    if isinstance(action, dto.MouseTripleClickAction):
        return _clicks(action, 3, width, height)
    if isinstance(action, dto.MouseMoveAction):
        return Plan(
            steps=[_move(action.x, action.y, action.relative, width, height)],
            hold=_hold(action.holdKey),
        )
    if isinstance(action, dto.MouseScrollAction):
        v, h = int(action.stepVertical), int(action.stepHorizontal)
        if abs(v) > MAX_SCROLL_STEPS or abs(h) > MAX_SCROLL_STEPS:
            raise BadRequestError(f"scroll steps must be within ±{MAX_SCROLL_STEPS}")
        wheel_cmd = _move(action.x, action.y, action.relative, width, height)
        for n, neg, pos in ((v, "up", "down"), (h, "left", "right")):
            if n:
                wheel = _WHEEL[pos if n > 0 else neg]
                wheel_cmd += ["click", "--repeat", str(abs(n)), "--delay", "20", wheel]
        return Plan(
            steps=[wheel_cmd], hold=_hold(action.holdKey), timeout=15.0 + (abs(v) + abs(h)) / 20
        )
    if isinstance(action, dto.MouseDragAction):
        buttons = _buttons(int(action.button))
        start = _move(action.startX, action.startY, action.startRelative, width, height, "start")
        end = _move(action.endX, action.endY, action.endRelative, width, height, "end")
        drag = [
            *start,
            *(w for b in buttons for w in ("mousedown", b)),
            *("sleep", _DRAG_PAUSE),
            *end,
            *("sleep", _DRAG_PAUSE),
            *(w for b in buttons for w in ("mouseup", b)),
        ]
        return Plan(steps=[drag], hold=_hold(action.holdKey))
    if isinstance(action, dto.KeyboardTypeAction):
        content = str(action.content)
        if len(content) > MAX_TYPE_CHARS:
            raise BadRequestError(f"content: at most {MAX_TYPE_CHARS} characters")
        if "\x00" in content:
            raise BadRequestError("content: NUL characters cannot be typed")
        type_cmd = ["type", "--delay", str(TYPE_DELAY_MS), "--"]
        typing: list[list[str]] = []
        if action.treatNewLineAsEnter:
            for i, line in enumerate(content.split("\n")):
                if i:
                    typing.append(["key", "--", "Return"])
                if line:
                    typing.append([*type_cmd, line])
        elif content:
            typing.append([*type_cmd, content])
        return Plan(steps=typing, timeout=15.0 + len(content) * TYPE_DELAY_MS / 1000 * 3)
    if isinstance(action, dto.KeyboardHotkeyAction):
        combos = _combos(str(action.keys), "keys")
        duration = action.duration
        if duration is None or duration <= 0:
            return Plan(steps=[["key", "--", *combos]])
        if duration > MAX_HOTKEY_MS:
            raise BadRequestError(f"duration: at most {MAX_HOTKEY_MS} ms")
        held: list[str] = []
        for c in combos:
            held += ["keydown", "--", c, "sleep", f"{duration / 1000:.3f}", "keyup", "--", c]
        return Plan(steps=[held], timeout=15.0 + len(combos) * duration / 1000)
    if isinstance(action, dto.KeyDownAction):
        return Plan(steps=[["keydown", "--", *_keys_each(str(action.key), "key")]])
    if isinstance(action, dto.KeyUpAction):
        return Plan(steps=[["keyup", "--", *_keys_each(str(action.key), "key")]])
    if isinstance(action, dto.WaitAction):
        ms = int(action.duration)
        if not 0 <= ms <= MAX_WAIT_MS:
            raise BadRequestError(f"duration: must be within 0..{MAX_WAIT_MS} ms")
        return Plan(wait_ms=ms)
    if isinstance(
        action,
        dto.ScreenshotAction | dto.FinishedAction | dto.FailedAction | dto.ClientUserTakeoverAction,
    ):
        return Plan()
    if isinstance(kind, str) and kind.startswith(_MOBILE_PREFIXES):
        raise UnsupportedActionError(f"{kind} is a mobile action; this is a Linux desktop sandbox")
    raise UnsupportedActionError(f"unsupported action type {str(kind)[:60]!r}")


async def xdotool(args: list[str], env: dict[str, str]) -> str:
    """Runs ``xdotool *args``; returns stdout. Unknown key names are errors, not no-ops.

    Callers bound it with a cancel scope; cancelling kills the process.
    """
    try:
        result = await anyio.run_process(
            ["xdotool", *args], env=env, check=False, stdin=subprocess.DEVNULL
        )
    except OSError as exc:
        raise ActionFailedError(f"cannot run xdotool: {exc.strerror or exc}") from exc
    err = result.stderr.decode("utf-8", "replace")
    if "No such key name" in err or "Invalid key sequence" in err:
        raise BadRequestError(f"unknown key name: {err.strip().splitlines()[0][:120]}")
    if result.returncode != 0:
        first = err.strip().splitlines()[0][:200] if err.strip() else f"exit {result.returncode}"
        raise ActionFailedError(f"xdotool failed: {first}")
    return result.stdout.decode("utf-8", "replace")


async def perform(p: Plan, env: dict[str, str]) -> None:
    """Runs a plan; held keys are released even if a step fails or is cancelled."""
    if p.wait_ms:
        await anyio.sleep(p.wait_ms / 1000)
    if not p.steps:
        return
    if p.hold:
        await _bounded(["keydown", "--", *p.hold], env, _SHORT)
    try:
        for step in p.steps:
            await _bounded(step, env, p.timeout)
    finally:
        if p.hold:
            with anyio.CancelScope(shield=True):
                await _bounded(["keyup", "--", *reversed(p.hold)], env, _SHORT)


async def _bounded(args: list[str], env: dict[str, str], seconds: float) -> str:
    try:
        with anyio.fail_after(seconds):
            return await xdotool(args, env)
    except TimeoutError as exc:
        raise ActionFailedError(f"xdotool did not finish within {seconds:.0f} s") from exc


async def pointer(env: dict[str, str]) -> tuple[int, int, int]:
    """The pointer's (x, y, screen)."""
    out = await _bounded(["getmouselocation", "--shell"], env, _SHORT)
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        return int(values["X"]), int(values["Y"]), int(values.get("SCREEN", "0"))
    except (KeyError, ValueError) as exc:
        raise ActionFailedError("xdotool did not report the pointer position") from exc
