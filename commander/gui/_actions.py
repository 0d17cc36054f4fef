"""Typed actions, one class per action DTO of the ``lybic`` SDK.

Coordinates are already pixels of the real screen (the parser mapped them);
:func:`to_sdk_action` builds the SDK's pydantic model with ``px`` lengths, so
the result can go straight into ``dto.ExecuteSandboxActionDto(action=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from typing import Any, ClassVar

from lybic import dto
from pydantic import BaseModel


class MouseButton(IntFlag):
    """The SDK's mouse button flags; add them to press several at once."""

    LEFT = 1
    RIGHT = 2
    MIDDLE = 4
    BACK = 8
    FORWARD = 16


@dataclass(frozen=True, slots=True)
class Point:
    """A pixel on the screen, or, with ``relative``, an offset from the pointer."""

    x: int
    y: int
    relative: bool = False


#: The pointer's current position.
HERE = Point(0, 0, relative=True)


@dataclass(frozen=True, slots=True)
class _Click:
    """What every kind of click has: where, which button, a key held meanwhile."""

    at: Point
    button: MouseButton = MouseButton.LEFT
    hold_key: str | None = None


@dataclass(frozen=True, slots=True)
class MouseClick(_Click):
    """A single click (``mouse:click``)."""

    type: ClassVar[str] = "mouse:click"


@dataclass(frozen=True, slots=True)
class MouseDoubleClick(_Click):
    """A double click (``mouse:doubleClick``)."""

    type: ClassVar[str] = "mouse:doubleClick"


@dataclass(frozen=True, slots=True)
class MouseTripleClick(_Click):
    """A triple click (``mouse:tripleClick``)."""

    type: ClassVar[str] = "mouse:tripleClick"


@dataclass(frozen=True, slots=True)
class MouseMove:
    """Moves the pointer (``mouse:move``)."""

    type: ClassVar[str] = "mouse:move"
    to: Point
    hold_key: str | None = None


@dataclass(frozen=True, slots=True)
class MouseDrag:
    """Presses at ``start``, moves to ``end``, releases (``mouse:drag``).

    A relative ``end`` is an offset from ``start`` (the SDK's ``endRelative``).
    """

    type: ClassVar[str] = "mouse:drag"
    start: Point
    end: Point
    button: MouseButton = MouseButton.LEFT
    hold_key: str | None = None


@dataclass(frozen=True, slots=True)
class MouseScroll:
    """Turns the wheel at a point (``mouse:scroll``).

    Steps are wheel clicks: positive ``step_vertical`` scrolls down, positive
    ``step_horizontal`` scrolls right (X11's wheel buttons 5 and 7). pyautogui's
    ``scroll(clicks)`` is the other way round (positive is up); the parser flips it.
    """

    type: ClassVar[str] = "mouse:scroll"
    at: Point
    step_vertical: int
    step_horizontal: int = 0
    hold_key: str | None = None


@dataclass(frozen=True, slots=True)
class KeyboardType:
    """Types text (``keyboard:type``); with ``submit_newlines`` each ``\\n`` presses Enter."""

    type: ClassVar[str] = "keyboard:type"
    content: str
    submit_newlines: bool = True


@dataclass(frozen=True, slots=True)
class KeyboardHotkey:
    """Presses a key combination in xdotool syntax, e.g. ``ctrl+c`` (``keyboard:hotkey``)."""

    type: ClassVar[str] = "keyboard:hotkey"
    keys: str
    duration_ms: int | None = None


@dataclass(frozen=True, slots=True)
class KeyDown:
    """Holds one key down (``key:down``)."""

    type: ClassVar[str] = "key:down"
    key: str


@dataclass(frozen=True, slots=True)
class KeyUp:
    """Releases one key (``key:up``)."""

    type: ClassVar[str] = "key:up"
    key: str


@dataclass(frozen=True, slots=True)
class Screenshot:
    """Takes a screenshot and does nothing else (``screenshot``)."""

    type: ClassVar[str] = "screenshot"


@dataclass(frozen=True, slots=True)
class Wait:
    """Waits, then the next screenshot shows what changed (``wait``)."""

    type: ClassVar[str] = "wait"
    duration_ms: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The model says the task is done (``finished``); ``message`` is its answer."""

    type: ClassVar[str] = "finished"
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """The model gives up (``failed``)."""

    type: ClassVar[str] = "failed"
    message: str | None = None


@dataclass(frozen=True, slots=True)
class CallUser:
    """The model asks the user to step in (``client:user-takeover``)."""

    type: ClassVar[str] = "client:user-takeover"


Action = (
    MouseClick
    | MouseDoubleClick
    | MouseTripleClick
    | MouseMove
    | MouseDrag
    | MouseScroll
    | KeyboardType
    | KeyboardHotkey
    | KeyDown
    | KeyUp
    | Screenshot
    | Wait
    | Finished
    | Failed
    | CallUser
)


def _px(v: int) -> Any:
    return dto.PixelLength(type="px", value=v)


def _at(point: Point) -> dict[str, Any]:
    """The SDK's x, y and relative of one point."""
    return {"x": _px(point.x), "y": _px(point.y), "relative": point.relative}


def to_sdk_action(action: Action) -> BaseModel:
    """The ``lybic`` SDK's DTO for ``action``, with pixel lengths."""
    result: BaseModel
    match action:
        case MouseClick() | MouseDoubleClick() | MouseTripleClick():
            cls = {
                "mouse:click": dto.MouseClickAction,
                "mouse:doubleClick": dto.MouseDoubleClickAction,
                "mouse:tripleClick": dto.MouseTripleClickAction,
            }[action.type]
            result = cls(
                type=action.type,
                **_at(action.at),
                button=int(action.button),
                holdKey=action.hold_key,
            )
        case MouseMove():
            result = dto.MouseMoveAction(
                type=action.type, **_at(action.to), holdKey=action.hold_key
            )
        case MouseDrag():
            result = dto.MouseDragAction(
                type=action.type,
                startX=_px(action.start.x),
                startY=_px(action.start.y),
                endX=_px(action.end.x),
                endY=_px(action.end.y),
                startRelative=action.start.relative,
                endRelative=action.end.relative,
                button=int(action.button),
                holdKey=action.hold_key,
            )
        case MouseScroll():
            result = dto.MouseScrollAction(
                type=action.type,
                **_at(action.at),
                stepVertical=action.step_vertical,
                stepHorizontal=action.step_horizontal,
                holdKey=action.hold_key,
            )
        case KeyboardType():
            result = dto.KeyboardTypeAction(
                type=action.type,
                content=action.content,
                treatNewLineAsEnter=action.submit_newlines,
            )
        case KeyboardHotkey():
            result = dto.KeyboardHotkeyAction(
                type=action.type, keys=action.keys, duration=action.duration_ms
            )
        case KeyDown():
            result = dto.KeyDownAction(type=action.type, key=action.key)
        case KeyUp():
            result = dto.KeyUpAction(type=action.type, key=action.key)
        case Screenshot():
            result = dto.ScreenshotAction(type=action.type)
        case Wait():
            result = dto.WaitAction(type=action.type, duration=action.duration_ms)
        case Finished():
            result = dto.FinishedAction(type=action.type, message=action.message)
        case Failed():
            result = dto.FailedAction(type=action.type, message=action.message)
        case CallUser():
            result = dto.ClientUserTakeoverAction(type=action.type)
    return result
