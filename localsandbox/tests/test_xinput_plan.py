"""Action DTO → xdotool argument lists, checked without an X server."""

from __future__ import annotations

from typing import Any

import pytest
from lybic import dto

from localsandbox._api import parse_action
from localsandbox._errors import BadRequestError, UnsupportedActionError
from localsandbox._keys import XDOTOOL_COMMANDS, keysym
from localsandbox._xinput import Plan, plan

W, H = 1280, 720


def px(v: int) -> Any:
    return dto.PixelLength(value=v)


def frac(n: int, d: int) -> Any:
    return dto.FractionalLength(numerator=n, denominator=d)


CASES: list[tuple[str, Any, Plan]] = [
    (
        "click-left",
        dto.MouseClickAction(x=px(10), y=px(20), button=1),
        Plan(steps=[["mousemove", "10", "20", "click", "--repeat", "1", "--delay", "60", "1"]]),
    ),
    (
        "click-right-fractional",
        dto.MouseClickAction(x=frac(1, 2), y=frac(1, 4), button=2),
        Plan(steps=[["mousemove", "640", "180", "click", "--repeat", "1", "--delay", "60", "3"]]),
    ),
    (
        "click-fraction-one-is-last-pixel",
        dto.MouseClickAction(x=frac(1000, 1000), y=frac(0, 1000), button=4),
        Plan(steps=[["mousemove", "1279", "0", "click", "--repeat", "1", "--delay", "60", "2"]]),
    ),
    (
        "click-here-relative",
        dto.MouseClickAction(x=px(0), y=px(0), button=1, relative=True),
        Plan(
            steps=[
                [
                    "mousemove_relative",
                    "--",
                    "0",
                    "0",
                    "click",
                    "--repeat",
                    "1",
                    "--delay",
                    "60",
                    "1",
                ]
            ]
        ),
    ),
    (
        "click-two-buttons-at-once",
        dto.MouseClickAction(x=px(1), y=px(2), button=3),
        Plan(
            steps=[
                [
                    "mousemove",
                    "1",
                    "2",
                    "mousedown",
                    "1",
                    "mousedown",
                    "3",
                    "mouseup",
                    "1",
                    "mouseup",
                    "3",
                ]
            ]
        ),
    ),
    (
        "click-hold-key",
        dto.MouseClickAction(x=px(1), y=px(2), button=1, holdKey="ctrl+shift"),
        Plan(
            steps=[["mousemove", "1", "2", "click", "--repeat", "1", "--delay", "60", "1"]],
            hold=["ctrl", "shift"],
        ),
    ),
    (
        "double-click",
        dto.MouseDoubleClickAction(x=px(5), y=px(6), button=1),
        Plan(steps=[["mousemove", "5", "6", "click", "--repeat", "2", "--delay", "60", "1"]]),
    ),
    (
        "triple-click",
        dto.MouseTripleClickAction(x=px(5), y=px(6), button=1),
        Plan(steps=[["mousemove", "5", "6", "click", "--repeat", "3", "--delay", "60", "1"]]),
    ),
    (
        "move",
        dto.MouseMoveAction(x=px(100), y=px(200)),
        Plan(steps=[["mousemove", "100", "200"]]),
    ),
    (
        "move-relative-negative",
        dto.MouseMoveAction(x=px(-30), y=px(40), relative=True),
        Plan(steps=[["mousemove_relative", "--", "-30", "40"]]),
    ),
    (
        "scroll-down",
        dto.MouseScrollAction(x=px(10), y=px(10), stepVertical=3, stepHorizontal=0),
        Plan(
            steps=[["mousemove", "10", "10", "click", "--repeat", "3", "--delay", "20", "5"]],
            timeout=15.15,
        ),
    ),
    (
        "scroll-up-and-left",
        dto.MouseScrollAction(x=px(10), y=px(10), stepVertical=-2, stepHorizontal=-1),
        Plan(
            steps=[
                [
                    "mousemove",
                    "10",
                    "10",
                    "click",
                    "--repeat",
                    "2",
                    "--delay",
                    "20",
                    "4",
                    "click",
                    "--repeat",
                    "1",
                    "--delay",
                    "20",
                    "6",
                ]
            ],
            timeout=15.15,
        ),
    ),
    (
        "drag",
        dto.MouseDragAction(startX=px(10), startY=px(20), endX=px(30), endY=px(40), button=1),
        Plan(
            steps=[
                [
                    "mousemove",
                    "10",
                    "20",
                    "mousedown",
                    "1",
                    "sleep",
                    "0.05",
                    "mousemove",
                    "30",
                    "40",
                    "sleep",
                    "0.05",
                    "mouseup",
                    "1",
                ]
            ]
        ),
    ),
    (
        "drag-from-here-to-offset",
        dto.MouseDragAction(
            startX=px(0),
            startY=px(0),
            endX=px(-5),
            endY=px(5),
            button=1,
            startRelative=True,
            endRelative=True,
        ),
        Plan(
            steps=[
                [
                    "mousemove_relative",
                    "--",
                    "0",
                    "0",
                    "mousedown",
                    "1",
                    "sleep",
                    "0.05",
                    "mousemove_relative",
                    "--",
                    "-5",
                    "5",
                    "sleep",
                    "0.05",
                    "mouseup",
                    "1",
                ]
            ]
        ),
    ),
    (
        "type-newlines-as-enter",
        dto.KeyboardTypeAction(content="ab\n-c", treatNewLineAsEnter=True),
        Plan(
            steps=[
                ["type", "--delay", "8", "--", "ab"],
                ["key", "--", "Return"],
                ["type", "--delay", "8", "--", "-c"],
            ],
            timeout=15.0 + 5 * 0.008 * 3,
        ),
    ),
    (
        "type-raw",
        dto.KeyboardTypeAction(content="--help\n"),
        Plan(steps=[["type", "--delay", "8", "--", "--help\n"]], timeout=15.0 + 7 * 0.008 * 3),
    ),
    (
        "hotkey",
        dto.KeyboardHotkeyAction(keys="ctrl+c"),
        Plan(steps=[["key", "--", "ctrl+c"]]),
    ),
    (
        "hotkey-sequence",
        dto.KeyboardHotkeyAction(keys="ctrl+a BackSpace"),
        Plan(steps=[["key", "--", "ctrl+a", "BackSpace"]]),
    ),
    (
        "hotkey-held",
        dto.KeyboardHotkeyAction(keys="shift+Tab", duration=250),
        Plan(
            steps=[["keydown", "--", "shift+Tab", "sleep", "0.250", "keyup", "--", "shift+Tab"]],
            timeout=15.25,
        ),
    ),
    (
        "hotkey-help-key-is-not-the-help-command",
        dto.KeyboardHotkeyAction(keys="Help ctrl+Help"),
        Plan(steps=[["key", "--", "0xff6a", "ctrl+Help"]]),
    ),
    (
        "hold-help-key",
        dto.MouseMoveAction(x=px(1), y=px(1), holdKey="shift+Help"),
        Plan(steps=[["mousemove", "1", "1"]], hold=["shift", "0xff6a"]),
    ),
    (
        "keysyms-aliases-and-keycodes",
        dto.KeyboardHotkeyAction(keys="Shift_L+KP_Enter XF86AudioMute CONTROL+Tab 38"),
        Plan(steps=[["key", "--", "Shift_L+KP_Enter", "XF86AudioMute", "CONTROL+Tab", "38"]]),
    ),
    ("key-down", dto.KeyDownAction(key="shift"), Plan(steps=[["keydown", "--", "shift"]])),
    ("key-up", dto.KeyUpAction(key="shift"), Plan(steps=[["keyup", "--", "shift"]])),
    ("wait", dto.WaitAction(duration=1500), Plan(wait_ms=1500)),
    ("screenshot", dto.ScreenshotAction(), Plan()),
    ("finished", dto.FinishedAction(message="ok"), Plan()),
    ("failed", dto.FailedAction(), Plan()),
    ("user-takeover", dto.ClientUserTakeoverAction(), Plan()),
]


@pytest.mark.parametrize(("name", "action", "expected"), CASES, ids=[c[0] for c in CASES])
def test_plan(name: str, action: Any, expected: Plan) -> None:
    got = plan(action, W, H)
    assert got.steps == expected.steps
    assert got.hold == expected.hold
    assert got.wait_ms == expected.wait_ms
    assert got.timeout == pytest.approx(expected.timeout)


BAD: list[tuple[str, Any, str]] = [
    ("x-off-screen", dto.MouseClickAction(x=px(1280), y=px(0), button=1), "outside the screen"),
    ("y-negative", dto.MouseMoveAction(x=px(0), y=px(-1)), "outside the screen"),
    ("fraction-over-one", dto.MouseMoveAction(x=frac(3, 2), y=px(0)), "outside 0..1"),
    ("zero-denominator", dto.MouseMoveAction(x=frac(1, 0), y=px(0)), "denominator"),
    ("huge-offset", dto.MouseMoveAction(x=px(99999), y=px(0), relative=True), "larger"),
    ("no-button", dto.MouseClickAction(x=px(1), y=px(1), button=0), "button"),
    ("button-flags-too-big", dto.MouseClickAction(x=px(1), y=px(1), button=64), "button"),
    ("key-option-smuggling", dto.KeyboardHotkeyAction(keys="--clearmodifiers"), "key syntax"),
    ("key-shell-chars", dto.KeyDownAction(key="a;rm -rf /"), "key syntax"),
    ("hold-key-bad", dto.MouseMoveAction(x=px(1), y=px(1), holdKey="ctrl+$(x)"), "key syntax"),
    ("hotkey-empty", dto.KeyboardHotkeyAction(keys="  "), "no key"),
    # xdotool would run `touch pwned` after pressing a (its command chaining).
    ("hotkey-chains-exec", dto.KeyboardHotkeyAction(keys="a exec touch pwned"), "'exec'"),
    ("hold-chains-exec", dto.MouseMoveAction(x=px(1), y=px(1), holdKey="a+exec+sh"), "'exec'"),
    ("key-down-chains-exec", dto.KeyDownAction(key="a+exec+touch+pwned"), "'exec'"),
    ("key-up-chains-type", dto.KeyUpAction(key="a+type+x"), "'type'"),
    ("hotkey-unknown-name", dto.KeyboardHotkeyAction(keys="ctrl+nosuchkey"), "unknown key"),
    ("type-nul", dto.KeyboardTypeAction(content="a\x00b"), "NUL"),
    ("type-huge", dto.KeyboardTypeAction(content="a" * 20_001), "at most"),
    (
        "scroll-huge",
        dto.MouseScrollAction(x=px(1), y=px(1), stepVertical=10_000, stepHorizontal=0),
        "scroll steps",
    ),
    ("wait-huge", dto.WaitAction(duration=3_600_000), "duration"),
    ("wait-negative", dto.WaitAction(duration=-1), "duration"),
    ("hotkey-held-too-long", dto.KeyboardHotkeyAction(keys="a", duration=60_000), "duration"),
]


@pytest.mark.parametrize(("name", "action", "says"), BAD, ids=[c[0] for c in BAD])
def test_invalid_actions_are_bad_requests(name: str, action: Any, says: str) -> None:
    with pytest.raises(BadRequestError, match=says.replace("$", r"\$").replace("(", r"\(")):
        plan(action, W, H)


def _commands(args: list[str]) -> int:
    """How many of ``args`` xdotool reads as a command name (it compares without case)."""
    return sum(a.lower() in XDOTOOL_COMMANDS for a in args)


@pytest.mark.parametrize("command", sorted(XDOTOOL_COMMANDS))
def test_no_xdotool_command_passes_as_a_key(command: str) -> None:
    """Every xdotool command name, in any case, wherever a key goes, is refused —
    or (``Help``, a real keysym) pressed through an argument that names no command."""
    for name in (command, command.upper(), command.capitalize()):
        # (action, xdotool commands the plan's one step may hold: its own)
        shapes: list[tuple[Any, int]] = [
            (dto.KeyboardHotkeyAction(keys=f"a {name}"), 1),
            (dto.KeyboardHotkeyAction(keys=name), 1),
            (dto.KeyboardHotkeyAction(keys=f"a {name}", duration=10), 6),
            (dto.KeyDownAction(key=f"a+{name}"), 1),
            (dto.KeyUpAction(key=name), 1),
            (dto.MouseClickAction(x=px(1), y=px(1), button=1, holdKey=f"a+{name}"), 2),
        ]
        for action, own in shapes:
            try:
                p = plan(action, W, H)
            except BadRequestError as exc:
                assert "unknown key name" in exc.args[0]
                continue
            assert keysym(name), f"{name!r} is no keysym but was accepted"
            assert [_commands(step) for step in p.steps] == [own], p
            assert _commands(p.hold) == 0, p


def test_the_help_keysym_is_pressed_by_number() -> None:
    assert keysym("Help") == 0xFF6A and not keysym("help") and not keysym("exec")
    p = plan(dto.KeyUpAction(key="Help"), W, H)
    assert p.steps == [["keyup", "--", "0xff6a"]]


def test_typed_text_is_one_argument_after_the_end_of_options() -> None:
    """type reads every argument after -- as text and never chains a command."""
    text = "a exec touch pwned --file /etc/passwd sleep 9"
    p = plan(dto.KeyboardTypeAction(content=text), W, H)
    assert p.steps == [["type", "--delay", "8", "--", text]]


def test_mobile_and_unknown_actions_are_unsupported() -> None:
    with pytest.raises(UnsupportedActionError, match="mobile action"):
        parse_action({"type": "touch:tap", "x": {"type": "px", "value": 1}})
    with pytest.raises(UnsupportedActionError, match="unknown action type"):
        parse_action({"type": "shell:exec", "command": "id"})
    with pytest.raises(BadRequestError, match="action: x: Field required"):
        parse_action({"type": "mouse:click", "y": {"type": "px", "value": 1}, "button": 1})
    with pytest.raises(BadRequestError, match="must be an object"):
        parse_action("mouse:click")


def test_parse_action_accepts_call_id_and_every_sdk_action() -> None:
    a = parse_action(
        {
            "type": "mouse:move",
            "x": {"type": "px", "value": 1},
            "y": {"type": "/", "numerator": 1, "denominator": 2},
            "callId": "c1",
        }
    )
    assert isinstance(a, dto.MouseMoveAction)
    for _, action, _ in CASES:
        again = parse_action(action.model_dump(exclude_none=True))
        assert type(again) is type(action)
