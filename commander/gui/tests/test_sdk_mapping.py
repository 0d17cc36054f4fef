"""Every action maps 1:1 onto the lybic SDK's action DTO, and the SDK accepts it."""

from __future__ import annotations

import pytest
from lybic import dto

from commander import gui

CASES: list[tuple[gui.Action, type, dict[str, object]]] = [
    (
        gui.MouseClick(gui.Point(10, 20), gui.MouseButton.RIGHT, hold_key="ctrl"),
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
        gui.MouseClick(gui.HERE),
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
        gui.MouseDoubleClick(gui.Point(1, 2)),
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
        gui.MouseTripleClick(gui.Point(1, 2), gui.MouseButton.MIDDLE),
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
        gui.MouseMove(gui.Point(-5, 7, relative=True)),
        dto.MouseMoveAction,
        {
            "type": "mouse:move",
            "x": {"type": "px", "value": -5},
            "y": {"type": "px", "value": 7},
            "relative": True,
        },
    ),
    (
        gui.MouseDrag(gui.HERE, gui.Point(30, 40)),
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
        gui.MouseScroll(gui.Point(3, 4), 5, -2),
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
        gui.KeyboardType("hi\n"),
        dto.KeyboardTypeAction,
        {"type": "keyboard:type", "content": "hi\n", "treatNewLineAsEnter": True},
    ),
    (
        gui.KeyboardHotkey("ctrl+c", duration_ms=100),
        dto.KeyboardHotkeyAction,
        {"type": "keyboard:hotkey", "keys": "ctrl+c", "duration": 100},
    ),
    (gui.KeyDown("shift"), dto.KeyDownAction, {"type": "key:down", "key": "shift"}),
    (gui.KeyUp("shift"), dto.KeyUpAction, {"type": "key:up", "key": "shift"}),
    (gui.Screenshot(), dto.ScreenshotAction, {"type": "screenshot"}),
    (gui.Wait(5000), dto.WaitAction, {"type": "wait", "duration": 5000}),
    (gui.Finished("ok"), dto.FinishedAction, {"type": "finished", "message": "ok"}),
    (gui.Failed("no"), dto.FailedAction, {"type": "failed", "message": "no"}),
    (gui.CallUser(), dto.ClientUserTakeoverAction, {"type": "client:user-takeover"}),
]


@pytest.mark.parametrize(("action", "cls", "wire"), CASES, ids=lambda v: getattr(v, "type", None))
def test_action_maps_onto_its_sdk_dto(
    action: gui.Action, cls: type, wire: dict[str, object]
) -> None:
    model = gui.to_sdk_action(action)
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
