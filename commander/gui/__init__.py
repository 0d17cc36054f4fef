"""GUI-agent model output → typed actions, by a whitelisting parser. Never eval, never exec.

Three output formats are read:

* UI-TARS / Doubao UI-TARS (:func:`parse_uitars`):
  ``Thought: …`` then ``Action: click(point='<point>x y</point>')``;
* pyautogui-style code (:func:`parse_pyautogui`), the subset the ``lybic``
  SDK's ``Pyautogui`` class accepts;
* one JSON action object (:func:`parse_json_action`), whose schema
  (:data:`JSON_ACTION_SCHEMA`) constrains a small model's decoding.

Coordinates are mapped from the model's convention (:class:`Relative1000`,
:class:`SmartResizedPixels` for UI-TARS-1.5, :class:`ScreenPixels`) to pixels
of the real screen. Every action class maps 1:1 onto an action DTO of the SDK
(:func:`to_sdk_action`). Anything else raises :class:`ParseError`, whose
message is written to be fed back to the model.
"""

from typing import Literal

from commander.gui._actions import (
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
from commander.gui._common import ParsedOutput
from commander.gui._coords import (
    CoordinateSpace,
    Relative1000,
    ScreenPixels,
    ScreenSize,
    SmartResizedPixels,
    smart_resize,
)
from commander.gui._errors import ParseError
from commander.gui._jsonaction import JSON_ACTION_SCHEMA, JSON_ACTIONS, parse_json_action
from commander.gui._pyautogui import parse_pyautogui
from commander.gui._uitars import parse_uitars

OutputFormat = Literal["ui-tars", "pyautogui", "json"]


def parse_model_output(
    text: str,
    *,
    output_format: OutputFormat,
    screen: ScreenSize,
    space: CoordinateSpace | None = None,
) -> ParsedOutput:
    """Parses ``text`` as ``output_format``: :func:`parse_uitars`, :func:`parse_pyautogui`
    or :func:`parse_json_action`."""
    if output_format == "ui-tars":
        return parse_uitars(text, screen=screen, space=space)
    if output_format == "pyautogui":
        return parse_pyautogui(text, screen=screen, space=space)
    if output_format == "json":
        return parse_json_action(text, screen=screen, space=space)
    raise ValueError(f"unknown output format {output_format!r}")


__all__ = [
    "HERE",
    "JSON_ACTIONS",
    "JSON_ACTION_SCHEMA",
    "Action",
    "CallUser",
    "CoordinateSpace",
    "Failed",
    "Finished",
    "KeyDown",
    "KeyUp",
    "KeyboardHotkey",
    "KeyboardType",
    "MouseButton",
    "MouseClick",
    "MouseDoubleClick",
    "MouseDrag",
    "MouseMove",
    "MouseScroll",
    "MouseTripleClick",
    "OutputFormat",
    "ParseError",
    "ParsedOutput",
    "Point",
    "Relative1000",
    "ScreenPixels",
    "ScreenSize",
    "Screenshot",
    "SmartResizedPixels",
    "Wait",
    "parse_json_action",
    "parse_model_output",
    "parse_pyautogui",
    "parse_uitars",
    "smart_resize",
    "to_sdk_action",
]
