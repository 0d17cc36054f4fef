"""commander.gui exports exactly its intended surface."""

from __future__ import annotations

import commander.gui

EXPECTED = {
    # parsing
    "parse_model_output",
    "parse_uitars",
    "parse_pyautogui",
    "parse_json_action",
    "JSON_ACTIONS",
    "JSON_ACTION_SCHEMA",
    "ParsedOutput",
    "OutputFormat",
    "ParseError",
    # coordinates
    "ScreenSize",
    "CoordinateSpace",
    "Relative1000",
    "SmartResizedPixels",
    "ScreenPixels",
    "smart_resize",
    # actions
    "Action",
    "Point",
    "HERE",
    "MouseButton",
    "MouseClick",
    "MouseDoubleClick",
    "MouseTripleClick",
    "MouseMove",
    "MouseDrag",
    "MouseScroll",
    "KeyboardType",
    "KeyboardHotkey",
    "KeyDown",
    "KeyUp",
    "Screenshot",
    "Wait",
    "Finished",
    "Failed",
    "CallUser",
    "to_sdk_action",
}


def test_all_is_the_intended_surface() -> None:
    assert set(commander.gui.__all__) == EXPECTED
    assert len(commander.gui.__all__) == len(EXPECTED)
    for name in EXPECTED:
        assert hasattr(commander.gui, name)


def test_parse_error_is_a_commander_error() -> None:
    from commander import CommanderError

    assert issubclass(commander.gui.ParseError, CommanderError)
    assert commander.gui.ParseError.code == "parse_error"
