"""Every action maps 1:1 onto the lybic SDK's action DTO, and the SDK accepts it."""

from __future__ import annotations

import pytest
from lybic import dto

from commander.gui import (
    HERE,
    Action,
    CallUser,
    Failed,
    Finished,
    KeyboardHotkey,
    KeyboardType,
    KeyDown,
    KeyUp,
    MouseButton,
    MouseClick,
    MouseDoubleClick,
    MouseDrag,
    MouseMove,
    MouseScroll,
    MouseTripleClick,
    Point,
    Screenshot,
    Wait,
    to_sdk_action,
)

CASES: list[tuple[Action, type, dict[str, object]]] = [
    (
        MouseClick(Point(10, 20), MouseButton.RIGHT, hold_key="ctrl"),
        dto.MouseClickAction,
        {
            "type": "mouse:click",
            "x": {"type": "px", "value": 10},
            "y": {"type": "px", "value": 20},
            "button": 2,
            "relative": False,
            "holdKey": "ctrl",
        },
    ),
    (
        MouseClick(HERE),
        dto.MouseClickAction,
        {
            "type": "mouse:click",
            "x": {"type": "px", "value": 0},
            "y": {"type": "px", "value": 0},
            "button": 1,
            "relative": True,
        },
    ),
    (
        MouseDoubleClick(Point(1, 2)),
        dto.MouseDoubleClickAction,
        {
            "type": "mouse:doubleClick",
            "x": {"type": "px", "value": 1},
            "y": {"type": "px", "value": 2},
            "button": 1,
            "relative": False,
        },
    ),
    (
        MouseTripleClick(Point(1, 2), MouseButton.MIDDLE),
        dto.MouseTripleClickAction,
        {
            "type": "mouse:tripleClick",
            "x": {"type": "px", "value": 1},
            "y": {"type": "px", "value": 2},
            "button": 4,
            "relative": False,
        },
    ),
    (
        MouseMove(Point(-5, 7, relative=True)),
        dto.MouseMoveAction,
        {
            "type": "mouse:move",
            "x": {"type": "px", "value": -5},
            "y": {"type": "px", "value": 7},
            "relative": True,
        },
    ),
    (
        MouseDrag(HERE, Point(30, 40)),
        dto.MouseDragAction,
        {
            "type": "mouse:drag",
            "startX": {"type": "px", "value": 0},
            "startY": {"type": "px", "value": 0},
            "endX": {"type": "px", "value": 30},
            "endY": {"type": "px", "value": 40},
            "startRelative": True,
            "endRelative": False,
            "button": 1,
        },
    ),
    (
        MouseScroll(Point(3, 4), 5, -2),
        dto.MouseScrollAction,
        {
            "type": "mouse:scroll",
            "x": {"type": "px", "value": 3},
            "y": {"type": "px", "value": 4},
            "stepVertical": 5,
            "stepHorizontal": -2,
            "relative": False,
        },
    ),
    (
        KeyboardType("hi\n"),
        dto.KeyboardTypeAction,
        {"type": "keyboard:type", "content": "hi\n", "treatNewLineAsEnter": True},
    ),
    (
        KeyboardHotkey("ctrl+c", duration_ms=100),
        dto.KeyboardHotkeyAction,
        {"type": "keyboard:hotkey", "keys": "ctrl+c", "duration": 100},
    ),
    (KeyDown("shift"), dto.KeyDownAction, {"type": "key:down", "key": "shift"}),
    (KeyUp("shift"), dto.KeyUpAction, {"type": "key:up", "key": "shift"}),
    (Screenshot(), dto.ScreenshotAction, {"type": "screenshot"}),
    (Wait(5000), dto.WaitAction, {"type": "wait", "duration": 5000}),
    (Finished("ok"), dto.FinishedAction, {"type": "finished", "message": "ok"}),
    (Failed("no"), dto.FailedAction, {"type": "failed", "message": "no"}),
    (CallUser(), dto.ClientUserTakeoverAction, {"type": "client:user-takeover"}),
]


@pytest.mark.parametrize(("action", "cls", "wire"), CASES, ids=lambda v: getattr(v, "type", None))
def test_action_maps_onto_its_sdk_dto(action: Action, cls: type, wire: dict[str, object]) -> None:
    model = to_sdk_action(action)
    assert type(model) is cls
    assert model.type == action.type  # type: ignore[attr-defined]
    assert model.model_dump(exclude_none=True) == wire
    # What the SDK sends (ExecuteSandboxActionDto) comes back as the same DTO class.
    body = dto.ExecuteSandboxActionDto(action=model).model_dump_json(exclude_none=True)
    again = dto.ExecuteSandboxActionDto.model_validate_json(body)
    assert type(again.action) is cls


def test_every_action_class_has_a_case() -> None:
    import typing

    from commander.gui import _actions

    classes = set(typing.get_args(_actions.Action))
    assert classes == {type(a) for a, _, _ in CASES}
