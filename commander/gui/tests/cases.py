"""The parser's test corpus, as data: (id, model output, expected actions or error).

Screen for every case: 1920x1080. Relative 0..1000 maps x by 1.92 and y by
1.08; UI-TARS-1.5's smart-resized frame for 1920x1080 is 1932x1092
(both multiples of 28), so 966,546 in that frame is the screen centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from commander import gui

SCREEN = gui.ScreenSize(1920, 1080)
REL = gui.Relative1000()
RESIZED = gui.SmartResizedPixels()
PIXELS = gui.ScreenPixels()

L, R, M = gui.MouseButton.LEFT, gui.MouseButton.RIGHT, gui.MouseButton.MIDDLE


@dataclass(frozen=True)
class Good:
    id: str
    fmt: gui.OutputFormat
    text: str
    actions: tuple[gui.Action, ...]
    space: gui.CoordinateSpace | None = None
    thought: str | None = None
    reflection: str | None = None


@dataclass(frozen=True)
class Bad:
    id: str
    fmt: gui.OutputFormat
    text: str
    #: Words the error message must contain (case-insensitive).
    says: tuple[str, ...] = field(default_factory=tuple)
    space: gui.CoordinateSpace | None = None


def P(x: int, y: int) -> gui.Point:
    return gui.Point(x, y)


GOOD: list[Good] = [
    # ---------------------------------------------------------------- UI-TARS, relative 0..1000
    Good(
        "uitars-click-point",
        "ui-tars",
        "Thought: The search box is at the top.\nAction: click(point='<point>500 500</point>')",
        (gui.MouseClick(P(960, 540), L),),
        thought="The search box is at the top.",
    ),
    Good(
        "uitars-click-start-box-tokens",
        "ui-tars",
        "Thought: x\nAction: click(start_box='<|box_start|>(100,200)<|box_end|>')",
        (gui.MouseClick(P(192, 216), L),),
    ),
    Good(
        "uitars-click-box-centre",
        "ui-tars",
        "Action: click(start_box='(100,200,300,400)')",
        (gui.MouseClick(P(384, 324), L),),
    ),
    Good(
        "uitars-click-bbox-tag",
        "ui-tars",
        "Action: click(start_box='<bbox>100 200 300 400</bbox>')",
        (gui.MouseClick(P(384, 324), L),),
    ),
    Good(
        "uitars-click-brackets",
        "ui-tars",
        "Action: click(start_box='[100, 200]')",
        (gui.MouseClick(P(192, 216), L),),
    ),
    Good(
        "uitars-left-single",
        "ui-tars",
        "Action: left_single(point='<point>0 0</point>')",
        (gui.MouseClick(P(0, 0), L),),
    ),
    Good(
        "uitars-edge-is-clamped",
        "ui-tars",
        "Action: click(point='<point>1000 1000</point>')",
        (gui.MouseClick(P(1919, 1079), L),),
    ),
    Good(
        "uitars-left-double",
        "ui-tars",
        "Thought: open it\nAction: left_double(point='<point>213 257</point>')",
        (gui.MouseDoubleClick(P(409, 278), L),),
    ),
    Good(
        "uitars-right-single",
        "ui-tars",
        "Action: right_single(point='<point>250 750</point>')",
        (gui.MouseClick(P(480, 810), R),),
    ),
    Good(
        "uitars-hover",
        "ui-tars",
        "Action: hover(start_box='(500,100)')",
        (gui.MouseMove(P(960, 108)),),
    ),
    Good(
        "uitars-mouse-move",
        "ui-tars",
        "Action: mouse_move(point='<point>250 250</point>')",
        (gui.MouseMove(P(480, 270)),),
    ),
    Good(
        "uitars-drag-points",
        "ui-tars",
        "Action: drag(start_point='<point>100 100</point>', end_point='<point>200 300</point>')",
        (gui.MouseDrag(P(192, 108), P(384, 324), L),),
    ),
    Good(
        "uitars-drag-boxes",
        "ui-tars",
        "Action: drag(start_box='(100,100)', end_box='(200,300)')",
        (gui.MouseDrag(P(192, 108), P(384, 324), L),),
    ),
    Good(
        "uitars-select-alias",
        "ui-tars",
        "Action: select(start_box='(100,100)', end_box='(200,300)')",
        (gui.MouseDrag(P(192, 108), P(384, 324), L),),
    ),
    Good(
        "uitars-hotkey-space-separated",
        "ui-tars",
        "Action: hotkey(key='ctrl c')",
        (gui.KeyboardHotkey("ctrl+c"),),
    ),
    Good(
        "uitars-hotkey-plus-separated",
        "ui-tars",
        "Action: hotkey(key='ctrl+shift+t')",
        (gui.KeyboardHotkey("ctrl+shift+t"),),
    ),
    Good(
        "uitars-hotkey-single-named",
        "ui-tars",
        "Action: hotkey(key='enter')",
        (gui.KeyboardHotkey("Return"),),
    ),
    Good(
        "uitars-hotkey-arrow",
        "ui-tars",
        "Action: hotkey(key='arrowleft')",
        (gui.KeyboardHotkey("Left"),),
    ),
    Good(
        "uitars-press-is-keydown",
        "ui-tars",
        "Action: press(key='shift')",
        (gui.KeyDown("shift"),),
    ),
    Good("uitars-keydown", "ui-tars", "Action: keydown(key='ctrl')", (gui.KeyDown("ctrl"),)),
    Good("uitars-keyup", "ui-tars", "Action: keyup(key='ctrl')", (gui.KeyUp("ctrl"),)),
    Good("uitars-release", "ui-tars", "Action: release(key='alt')", (gui.KeyUp("alt"),)),
    Good(
        "uitars-type-plain",
        "ui-tars",
        "Action: type(content='hello world')",
        (gui.KeyboardType("hello world"),),
    ),
    Good(
        "uitars-type-submit-newline",
        "ui-tars",
        "Action: type(content='weather in Paris\\n')",
        (gui.KeyboardType("weather in Paris\n"),),
    ),
    Good(
        "uitars-type-escaped-quotes",
        "ui-tars",
        "Action: type(content='it\\'s \"quoted\"')",
        (gui.KeyboardType('it\'s "quoted"'),),
    ),
    Good(
        # UI-TARS leaves apostrophes unescaped; the reference parser re-escapes them.
        "uitars-type-bare-apostrophe",
        "ui-tars",
        "Thought: type it\nAction: type(content='It's a test')",
        (gui.KeyboardType("It's a test"),),
    ),
    Good(
        "uitars-type-bare-apostrophes-and-quotes",
        "ui-tars",
        "Action: type(content='don't say 'maybe' - it's Bob's turn\n')",
        (gui.KeyboardType("don't say 'maybe' - it's Bob's turn\n"),),
    ),
    Good(
        "uitars-finished-bare-apostrophe",
        "ui-tars",
        "Action: finished(content='It's done: the file's saved.')",
        (gui.Finished("It's done: the file's saved."),),
    ),
    Good(
        "uitars-bare-apostrophe-then-more-actions",
        "ui-tars",
        "Action: type(content='I'm here')\nhotkey(key='enter')",
        (gui.KeyboardType("I'm here"), gui.KeyboardHotkey("Return")),
    ),
    Good(
        "uitars-type-double-quoted",
        "ui-tars",
        'Action: type(content="it\'s fine")',
        (gui.KeyboardType("it's fine"),),
    ),
    Good(
        "uitars-type-raw-newline-inside-quotes",
        "ui-tars",
        "Action: type(content='line one\nline two')",
        (gui.KeyboardType("line one\nline two"),),
    ),
    Good(
        "uitars-type-parens-inside-quotes",
        "ui-tars",
        "Action: type(content='f(x) = (a, b)')",
        (gui.KeyboardType("f(x) = (a, b)"),),
    ),
    Good(
        "uitars-type-unicode",
        "ui-tars",
        "Action: type(content='Grüße, 世界 \\u00e9')",
        (gui.KeyboardType("Grüße, 世界 é"),),
    ),
    Good(
        "uitars-type-injection-escaped-is-just-text",
        "ui-tars",
        "Action: type(content='\\'); __import__(\\'os\\').system(\\'x\\') #')",
        (gui.KeyboardType("'); __import__('os').system('x') #"),),
    ),
    Good(
        "uitars-type-empty",
        "ui-tars",
        "Action: type(content='')",
        (gui.KeyboardType(""),),
    ),
    Good(
        "uitars-scroll-down",
        "ui-tars",
        "Action: scroll(point='<point>500 500</point>', direction='down')",
        (gui.MouseScroll(P(960, 540), 5, 0),),
    ),
    Good(
        "uitars-scroll-up",
        "ui-tars",
        "Action: scroll(start_box='(500,500)', direction='up')",
        (gui.MouseScroll(P(960, 540), -5, 0),),
    ),
    Good(
        "uitars-scroll-right",
        "ui-tars",
        "Action: scroll(point='<point>500 500</point>', direction='right')",
        (gui.MouseScroll(P(960, 540), 0, 5),),
    ),
    Good(
        "uitars-scroll-left-no-point",
        "ui-tars",
        "Action: scroll(direction='left')",
        (gui.MouseScroll(gui.HERE, 0, -5),),
    ),
    Good("uitars-wait", "ui-tars", "Thought: loading\nAction: wait()", (gui.Wait(5000),)),
    Good(
        "uitars-finished",
        "ui-tars",
        "Thought: done\nAction: finished(content='The answer is 42.')",
        (gui.Finished("The answer is 42."),),
    ),
    Good("uitars-finished-bare", "ui-tars", "Action: finished()", (gui.Finished(None),)),
    Good("uitars-call-user", "ui-tars", "Action: call_user()", (gui.CallUser(),)),
    Good(
        "uitars-multiple-actions",
        "ui-tars",
        "Thought: fill the form\nAction: click(point='<point>100 100</point>')\n\n"
        "type(content='abc')\nhotkey(key='enter')",
        (gui.MouseClick(P(192, 108), L), gui.KeyboardType("abc"), gui.KeyboardHotkey("Return")),
    ),
    Good(
        "uitars-reflection-and-summary",
        "ui-tars",
        "Reflection: the last click missed\nAction_Summary: click again\n"
        "Action: click(point='<point>10 10</point>')",
        (gui.MouseClick(P(19, 11), L),),
        # The reference parser's thought for this format is the Action_Summary.
        thought="click again",
        reflection="the last click missed",
    ),
    Good(
        "uitars-action-summary-only",
        "ui-tars",
        "Action_Summary: open the file menu\nAction: click(point='<point>10 10</point>')",
        (gui.MouseClick(P(19, 11), L),),
        thought="open the file menu",
        reflection="",
    ),
    Good(
        "uitars-thought-wins-over-summary",
        "ui-tars",
        "Thought: the menu is at the top\nAction_Summary: click it\n"
        "Action: click(point='<point>10 10</point>')",
        (gui.MouseClick(P(19, 11), L),),
        thought="the menu is at the top",
    ),
    Good(
        "uitars-thought-multiline",
        "ui-tars",
        "Thought: first line\nsecond line\nNext action: click the icon.\n"
        "Action: click(point='<point>10 10</point>')",
        (gui.MouseClick(P(19, 11), L),),
        thought="first line\nsecond line\nNext action: click the icon.",
    ),
    Good(
        "uitars-bare-call-without-header",
        "ui-tars",
        "click(point='<point>500 500</point>')",
        (gui.MouseClick(P(960, 540), L),),
    ),
    Good(
        "uitars-float-coordinates",
        "ui-tars",
        "Action: click(point='<point>500.5 499.5</point>')",
        (gui.MouseClick(P(961, 539), L),),
    ),
    # ------------------------------------------------ UI-TARS-1.5, smart-resized pixels
    Good(
        "uitars15-click-centre",
        "ui-tars",
        "Thought: centre\nAction: click(start_box='<|box_start|>(966,546)<|box_end|>')",
        (gui.MouseClick(P(960, 540), L),),
        space=RESIZED,
    ),
    Good(
        "uitars15-click-far-edge",
        "ui-tars",
        "Action: click(start_box='(1932,1092)')",
        (gui.MouseClick(P(1919, 1079), L),),
        space=RESIZED,
    ),
    Good(
        "uitars15-drag",
        "ui-tars",
        "Action: drag(start_box='(0,0)', end_box='(483,273)')",
        (gui.MouseDrag(P(0, 0), P(480, 270), L),),
        space=RESIZED,
    ),
    Good(
        "uitars15-scroll",
        "ui-tars",
        "Action: scroll(start_box='(966,546)', direction='down')",
        (gui.MouseScroll(P(960, 540), 5, 0),),
        space=RESIZED,
    ),
    # ---------------------------------------------------------------- pyautogui
    Good(
        "pyautogui-click-xy",
        "pyautogui",
        "pyautogui.click(100, 200)",
        (gui.MouseClick(P(100, 200), L),),
    ),
    Good(
        "pyautogui-click-kwargs",
        "pyautogui",
        "pyautogui.click(x=1443, y=343)",
        (gui.MouseClick(P(1443, 343), L),),
    ),
    Good(
        "pyautogui-click-tuple",
        "pyautogui",
        "pyautogui.click((10, 20))",
        (gui.MouseClick(P(10, 20), L),),
    ),
    Good(
        "pyautogui-click-here",
        "pyautogui",
        "pyautogui.click()",
        (gui.MouseClick(gui.HERE, L),),
    ),
    Good(
        "pyautogui-click-clicks-2",
        "pyautogui",
        "pyautogui.click(100, 200, clicks=2)",
        (gui.MouseDoubleClick(P(100, 200), L),),
    ),
    Good(
        "pyautogui-click-right-button",
        "pyautogui",
        "pyautogui.click(100, 200, button='right')",
        (gui.MouseClick(P(100, 200), R),),
    ),
    Good(
        "pyautogui-click-sdk-generated-form",
        "pyautogui",
        "```python\n        pyautogui.click(x=10, y=20, clicks=1, interval=0.0, button='left', "
        "duration=0.0, tween=None, logScreenshot=None, _pause=True)\n        ```",
        (gui.MouseClick(P(10, 20), L),),
    ),
    Good(
        "pyautogui-double-click",
        "pyautogui",
        "pyautogui.doubleClick(5, 6)",
        (gui.MouseDoubleClick(P(5, 6), L),),
    ),
    Good(
        "pyautogui-triple-click",
        "pyautogui",
        "pyautogui.tripleClick(5, 6)",
        (gui.MouseTripleClick(P(5, 6), L),),
    ),
    Good(
        "pyautogui-right-click",
        "pyautogui",
        "pyautogui.rightClick(5, 6)",
        (gui.MouseClick(P(5, 6), R),),
    ),
    Good(
        "pyautogui-middle-click",
        "pyautogui",
        "pyautogui.middleClick(5, 6)",
        (gui.MouseClick(P(5, 6), M),),
    ),
    Good(
        "pyautogui-move-to",
        "pyautogui",
        "pyautogui.moveTo(100, 150)",
        (gui.MouseMove(P(100, 150)),),
    ),
    Good(
        "pyautogui-move-relative",
        "pyautogui",
        "pyautogui.move(None, 10)",
        (gui.MouseMove(gui.Point(0, 10, relative=True)),),
    ),
    Good(
        "pyautogui-move-negative",
        "pyautogui",
        "pyautogui.move(-30, -40)",
        (gui.MouseMove(gui.Point(-30, -40, relative=True)),),
    ),
    Good(
        "pyautogui-drag-to",
        "pyautogui",
        "pyautogui.dragTo(500, 500, duration=0.5)",
        (gui.MouseDrag(gui.HERE, P(500, 500), L),),
    ),
    Good(
        "pyautogui-scroll-up-flips-sign",
        "pyautogui",
        "pyautogui.scroll(100)",
        (gui.MouseScroll(gui.HERE, -100, 0),),
    ),
    Good(
        "pyautogui-scroll-down-at-point",
        "pyautogui",
        "pyautogui.scroll(-5, x=300, y=400)",
        (gui.MouseScroll(P(300, 400), 5, 0),),
    ),
    Good(
        "pyautogui-write",
        "pyautogui",
        "pyautogui.write('Hello world!')",
        (gui.KeyboardType("Hello world!"),),
    ),
    Good(
        "pyautogui-typewrite-string",
        "pyautogui",
        "pyautogui.typewrite(message='x\\ny', interval=0.1)",
        (gui.KeyboardType("x\ny"),),
    ),
    Good(
        "pyautogui-typewrite-list",
        "pyautogui",
        "pyautogui.typewrite(['a', 'b', 'c', 'left', 'backspace', 'enter', 'f1'])",
        (
            gui.KeyboardType("abc"),
            gui.KeyboardHotkey("Left"),
            gui.KeyboardHotkey("BackSpace"),
            gui.KeyboardHotkey("Return"),
            gui.KeyboardHotkey("F1"),
        ),
    ),
    Good("pyautogui-press", "pyautogui", "pyautogui.press('esc')", (gui.KeyboardHotkey("Escape"),)),
    Good(
        "pyautogui-press-list-presses",
        "pyautogui",
        "pyautogui.press(['tab', 'enter'], presses=2)",
        (
            gui.KeyboardHotkey("Tab"),
            gui.KeyboardHotkey("Return"),
            gui.KeyboardHotkey("Tab"),
            gui.KeyboardHotkey("Return"),
        ),
    ),
    Good(
        "pyautogui-press-char",
        "pyautogui",
        "pyautogui.press('/')",
        (gui.KeyboardHotkey("slash"),),
    ),
    Good(
        "pyautogui-hotkey",
        "pyautogui",
        "pyautogui.hotkey('ctrl', 'c')",
        (gui.KeyboardHotkey("ctrl+c"),),
    ),
    Good(
        "pyautogui-hotkey-list",
        "pyautogui",
        "pyautogui.hotkey(['alt', 'tab'], interval=0.1)",
        (gui.KeyboardHotkey("alt+Tab"),),
    ),
    Good(
        "pyautogui-hotkey-mac-names",
        "pyautogui",
        "pyautogui.hotkey('command', 'option', 'esc')",
        (gui.KeyboardHotkey("super+alt+Escape"),),
    ),
    Good("pyautogui-key-down", "pyautogui", "pyautogui.keyDown('shift')", (gui.KeyDown("shift"),)),
    Good("pyautogui-key-up", "pyautogui", "pyautogui.keyUp('shift')", (gui.KeyUp("shift"),)),
    Good(
        "pyautogui-sleep-and-import",
        "pyautogui",
        "import pyautogui\nimport time\npyautogui.click(1, 2)\ntime.sleep(1.5)",
        (gui.MouseClick(P(1, 2), L), gui.Wait(1500)),
    ),
    Good(
        "pyautogui-fenced-with-prose",
        "pyautogui",
        "I will open the menu.\n```python\npyautogui.rightClick(10, 10)\n"
        "pyautogui.press('down')\n```\nThen confirm.",
        (gui.MouseClick(P(10, 10), R), gui.KeyboardHotkey("Down")),
        thought="I will open the menu.\n\nThen confirm.",
    ),
    Good(
        "pyautogui-prose-lines-without-fence",
        "pyautogui",
        "Click the button, then type.\npyautogui.click(10, 10)\npyautogui.write('ok')",
        (gui.MouseClick(P(10, 10), L), gui.KeyboardType("ok")),
        thought="Click the button, then type.",
    ),
    Good(
        "pyautogui-comments",
        "pyautogui",
        "# open the file menu\npyautogui.hotkey('alt', 'f')  # menu",
        (gui.KeyboardHotkey("alt+f"),),
    ),
    Good("pyautogui-osworld-wait", "pyautogui", "WAIT", (gui.Wait(5000),)),
    Good("pyautogui-osworld-done", "pyautogui", "DONE", (gui.Finished(),)),
    Good("pyautogui-osworld-fail", "pyautogui", "FAIL", (gui.Failed(),)),
    Good(
        "pyautogui-write-injection-is-just-text",
        "pyautogui",
        "pyautogui.write(\"'); __import__('os').system('touch /tmp/pwned') #\")",
        (gui.KeyboardType("'); __import__('os').system('touch /tmp/pwned') #"),),
    ),
    Good(
        "pyautogui-relative-1000-space",
        "pyautogui",
        "pyautogui.click(500, 500)",
        (gui.MouseClick(P(960, 540), L),),
        space=REL,
    ),
    Good(
        "pyautogui-resized-space",
        "pyautogui",
        "pyautogui.moveTo(966, 546)",
        (gui.MouseMove(P(960, 540)),),
        space=RESIZED,
    ),
    Good(
        "pyautogui-resized-space-relative-move",
        "pyautogui",
        "pyautogui.move(966, 0)",
        (gui.MouseMove(gui.Point(960, 0, relative=True)),),
        space=RESIZED,
    ),
]


BAD: list[Bad] = [
    # ---------------------------------------------------------------- structure
    Bad("uitars-no-action-line", "ui-tars", "Thought: I am thinking.", ("no 'action:' line",)),
    Bad("uitars-empty-action", "ui-tars", "Thought: x\nAction:   ", ("empty",)),
    Bad("uitars-unknown-action", "ui-tars", "Action: explode()", ("unknown action", "click")),
    Bad("uitars-not-a-call", "ui-tars", "Action: click", ("expected '('",)),
    Bad(
        "uitars-missing-paren",
        "ui-tars",
        "Action: click(point='<point>1 2</point>'",
        ("missing ')'",),
    ),
    Bad(
        "uitars-unterminated-string",
        "ui-tars",
        "Action: type(content='abc)",
        ("unterminated string",),
    ),
    Bad(
        # An apostrophe before a comma is ambiguous (the end of the string, or text?):
        # the tolerant reading does not guess, and the strict reading's error stands.
        "uitars-unescaped-quote-ambiguous",
        "ui-tars",
        "Action: type(content='the users', 'files')",
        ("positional argument follows keyword argument",),
    ),
    Bad(
        "uitars-unescaped-quote-unterminated",
        "ui-tars",
        "Action: type(content='one', two')",
        ("unterminated string", "\\'"),
    ),
    Bad(
        "uitars-trailing-garbage",
        "ui-tars",
        "Action: click(point='<point>1 2</point>') and then more",
        ("unexpected text",),
    ),
    Bad(
        "uitars-missing-argument",
        "ui-tars",
        "Action: click()",
        ("needs 'start_box'", "click(point="),
    ),
    Bad(
        "uitars-positional-argument",
        "ui-tars",
        "Action: click('<point>1 2</point>')",
        ("keyword arguments only",),
    ),
    Bad(
        "uitars-unexpected-argument",
        "ui-tars",
        "Action: click(point='<point>1 2</point>', element_info='x')",
        ("unexpected argument 'element_info'",),
    ),
    Bad("uitars-type-needs-content", "ui-tars", "Action: type()", ("needs 'content'",)),
    Bad(
        "uitars-type-number",
        "ui-tars",
        "Action: type(content=42)",
        ("must be a quoted string",),
    ),
    Bad(
        "uitars-bad-direction",
        "ui-tars",
        "Action: scroll(point='<point>1 2</point>', direction='sideways')",
        ("direction must be",),
    ),
    Bad("uitars-unknown-key", "ui-tars", "Action: hotkey(key='ctrl hyperdrive')", ("unknown key",)),
    Bad(
        "uitars-too-many-keys",
        "ui-tars",
        "Action: hotkey(key='a b c d e f g')",
        ("at most 6 keys",),
    ),
    Bad(
        "uitars-key-option-smuggling",
        "ui-tars",
        "Action: hotkey(key='--clearmodifiers')",
        ("unknown key",),
    ),
    Bad(
        "uitars-bad-point-text",
        "ui-tars",
        "Action: click(point='the OK button')",
        ("cannot read coordinates",),
    ),
    Bad(
        "uitars-three-numbers",
        "ui-tars",
        "Action: click(start_box='(1,2,3)')",
        ("cannot read coordinates",),
    ),
    # ---------------------------------------------------------------- absurd coordinates
    Bad(
        "coord-negative",
        "ui-tars",
        "Action: click(point='<point>-5 10</point>')",
        ("outside the screen", "0..1000"),
    ),
    Bad(
        "coord-huge",
        "ui-tars",
        "Action: click(point='<point>99999999 10</point>')",
        ("outside the screen",),
    ),
    Bad(
        "coord-just-over",
        "ui-tars",
        "Action: click(point='<point>1001 10</point>')",
        ("outside the screen",),
    ),
    Bad(
        "coord-nan-text",
        "ui-tars",
        "Action: click(point='<point>nan 10</point>')",
        ("cannot read coordinates",),
    ),
    Bad(
        "coord-resized-over-frame",
        "ui-tars",
        "Action: click(start_box='(1933,10)')",
        ("outside the screen", "0..1932"),
        space=RESIZED,
    ),
    Bad(
        "coord-pyautogui-negative",
        "pyautogui",
        "pyautogui.click(-1, 10)",
        ("outside the screen",),
    ),
    Bad(
        "coord-pyautogui-off-screen",
        "pyautogui",
        "pyautogui.click(1921, 10)",
        ("outside the screen", "0..1920"),
    ),
    Bad(
        "coord-pyautogui-infinite",
        "pyautogui",
        "pyautogui.moveTo(1e999, 10)",
        ("finite",),
    ),
    Bad(
        "coord-pyautogui-big-int",
        "pyautogui",
        "pyautogui.moveTo(10**400, 10)",
        ("arithmetic",),
    ),
    Bad(
        "coord-pyautogui-huge-literal",
        "pyautogui",
        "pyautogui.moveTo(" + "9" * 400 + ", 10)",
        # Refused as a literal (was "outside the screen"): an integer too large to
        # print in a message (> 4300 digits, or 0xfff…) must not crash the parser.
        ("more than 15 digits",),
    ),
    Bad(
        "coord-pyautogui-bool",
        "pyautogui",
        "pyautogui.click(True, 10)",
        ("must be a number",),
    ),
    Bad(
        "coord-pyautogui-one-missing",
        "pyautogui",
        "pyautogui.click(10)",
        ("both x and y",),
    ),
    Bad(
        "coord-pyautogui-huge-move",
        "pyautogui",
        "pyautogui.move(100000, 0)",
        ("larger than the screen",),
    ),
    # ---------------------------------------------------------------- code injection, UI-TARS
    Bad(
        "inject-uitars-break-out-of-content",
        "ui-tars",
        "Action: type(content=''); __import__('os').system('touch /tmp/pwned') #')",
        ("unexpected text",),
    ),
    Bad(
        "inject-uitars-next-line-call",
        "ui-tars",
        "Action: type(content='')\n__import__('os').system('touch /tmp/pwned')",
        ("unexpected text",),
    ),
    Bad(
        "inject-uitars-fstring",
        "ui-tars",
        "Action: type(content=f\"{__import__('os').system('touch /tmp/pwned')}\")",
        ("f-strings are not allowed",),
    ),
    Bad(
        "inject-uitars-dunder-attribute",
        "ui-tars",
        "Action: type(content=().__class__.__base__.__subclasses__())",
        ("not allowed",),
    ),
    Bad(
        "inject-uitars-call-in-argument",
        "ui-tars",
        "Action: click(point=exec('import os'))",
        ("calls inside arguments",),
    ),
    Bad(
        "inject-uitars-name-in-argument",
        "ui-tars",
        "Action: type(content=__builtins__)",
        ("variable names",),
    ),
    Bad(
        "inject-uitars-lambda",
        "ui-tars",
        "Action: type(content=(lambda: __import__('os'))())",
        ("calls inside arguments",),
    ),
    Bad(
        "inject-uitars-lambda-bare",
        "ui-tars",
        "Action: type(content=lambda: 1)",
        ("lambdas",),
    ),
    Bad(
        "inject-uitars-comprehension",
        "ui-tars",
        "Action: type(content=[c for c in 'abc'])",
        ("comprehensions",),
    ),
    Bad(
        "inject-uitars-walrus",
        "ui-tars",
        "Action: type(content=(x := 'a'))",
        ("assignment expressions",),
    ),
    Bad(
        "inject-uitars-concat",
        "ui-tars",
        "Action: type(content='a' + 'b')",
        ("arithmetic",),
    ),
    Bad(
        "inject-uitars-kwargs-splat",
        "ui-tars",
        "Action: click(**{'point': '<point>1 2</point>'})",
        ("**kwargs",),
    ),
    Bad(
        "inject-uitars-args-splat",
        "ui-tars",
        "Action: click(*['<point>1 2</point>'])",
        ("*args",),
    ),
    Bad(
        "inject-uitars-method-call",
        "ui-tars",
        "Action: os.system('touch /tmp/pwned')",
        ("expected '('",),
    ),
    Bad(
        "inject-uitars-bytes",
        "ui-tars",
        "Action: type(content=b'abc')",
        ("bytes literals",),
    ),
    Bad(
        "inject-uitars-subscript",
        "ui-tars",
        "Action: type(content='abc'[0])",
        ("subscripts",),
    ),
    Bad(
        "inject-uitars-eval-named-action",
        "ui-tars",
        "Action: eval('1')",
        ("unknown action 'eval'",),
    ),
    Bad(
        "inject-uitars-dunder-action",
        "ui-tars",
        "Action: __import__('os')",
        ("unknown action '__import__'",),
    ),
    # ---------------------------------------------------------------- code injection, pyautogui
    Bad(
        "inject-pyautogui-import-os",
        "pyautogui",
        "import os\nos.system('touch /tmp/pwned')",
        ("importing 'os'",),
    ),
    Bad(
        "inject-pyautogui-from-import",
        "pyautogui",
        "from os import system",
        ("ImportFrom statements are not allowed",),
    ),
    Bad(
        "inject-pyautogui-import-alias",
        "pyautogui",
        "import os as pyautogui",
        ("importing 'os'",),
    ),
    Bad(
        "inject-pyautogui-dunder-import",
        "pyautogui",
        "__import__('os').system('touch /tmp/pwned')",
        ("only direct calls",),
    ),
    Bad(
        "inject-pyautogui-other-module",
        "pyautogui",
        "subprocess.run(['touch', '/tmp/pwned'])",
        ("only direct calls",),
    ),
    Bad(
        "inject-pyautogui-unknown-function",
        "pyautogui",
        "pyautogui.screenshot('/tmp/pwned.png')",
        ("'pyautogui.screenshot' is not an allowed function",),
    ),
    Bad(
        "inject-pyautogui-dunder-attr",
        "pyautogui",
        "pyautogui.__dict__['click'](1, 2)",
        ("only direct calls",),
    ),
    Bad(
        "inject-pyautogui-chained-attr",
        "pyautogui",
        "pyautogui.os.system('touch /tmp/pwned')",
        ("only direct calls",),
    ),
    Bad(
        "inject-pyautogui-fstring",
        "pyautogui",
        "pyautogui.write(f\"{__import__('os').system('touch /tmp/pwned')}\")",
        ("f-strings",),
    ),
    Bad(
        "inject-pyautogui-call-in-arg",
        "pyautogui",
        "pyautogui.write(open('/etc/passwd').read())",
        ("calls inside arguments",),
    ),
    Bad(
        "inject-pyautogui-assignment",
        "pyautogui",
        "x = __import__('os')",
        ("Assign statements",),
    ),
    Bad(
        "inject-pyautogui-loop",
        "pyautogui",
        "for i in range(3):\n    pyautogui.click(1, 1)",
        ("For statements",),
    ),
    Bad(
        "inject-pyautogui-def",
        "pyautogui",
        "def f():\n    pass\nf()",
        ("FunctionDef statements",),
    ),
    Bad(
        "inject-pyautogui-lambda-statement",
        "pyautogui",
        "(lambda: __import__('os').system('touch /tmp/pwned'))()",
        ("only direct calls",),
    ),
    Bad(
        "inject-pyautogui-exec",
        "pyautogui",
        "exec(\"__import__('os').system('touch /tmp/pwned')\")",
        ("'exec' is not an allowed function",),
    ),
    Bad(
        "inject-pyautogui-semicolon",
        "pyautogui",
        "pyautogui.click(1, 1); import os",
        ("importing 'os'",),
    ),
    Bad(
        "inject-pyautogui-tween-function",
        "pyautogui",
        "pyautogui.moveTo(1, 1, tween=pyautogui.easeInQuad)",
        ("attribute access",),
    ),
    Bad(
        "inject-pyautogui-comprehension-arg",
        "pyautogui",
        "pyautogui.typewrite([c for c in 'abc'])",
        ("comprehensions",),
    ),
    Bad(
        "inject-pyautogui-with",
        "pyautogui",
        "with open('/tmp/pwned', 'w'):\n    pass",
        ("With statements",),
    ),
    Bad(
        "inject-pyautogui-unterminated-fence",
        "pyautogui",
        "```python\npyautogui.click(1, 1)\n",
        ("unterminated ``` code block",),
    ),
    Bad(
        "pyautogui-unterminated-string",
        "pyautogui",
        "pyautogui.write('abc)",
        ("invalid syntax",),
    ),
    Bad(
        "pyautogui-image-locate",
        "pyautogui",
        "pyautogui.click('button.png')",
        ("locating an image",),
    ),
    Bad(
        "pyautogui-position",
        "pyautogui",
        "pyautogui.position()",
        ("performs no action",),
    ),
    Bad(
        "pyautogui-too-many-clicks",
        "pyautogui",
        "pyautogui.click(1, 1, clicks=10)",
        ("clicks must be within 1..3",),
    ),
    Bad(
        "pyautogui-bad-button",
        "pyautogui",
        "pyautogui.click(1, 1, button='turbo')",
        ("button must be",),
    ),
    Bad(
        "pyautogui-unknown-kwarg",
        "pyautogui",
        "pyautogui.click(1, 1, force=True)",
        ("unexpected argument 'force'",),
    ),
    Bad(
        "pyautogui-too-many-positional",
        "pyautogui",
        "pyautogui.keyDown('a', 1, 2, 3)",
        ("at most 3 positional",),
    ),
    Bad(
        "pyautogui-scroll-absurd",
        "pyautogui",
        "pyautogui.scroll(-100000)",
        ("within -200..200",),
    ),
    Bad(
        "pyautogui-sleep-absurd",
        "pyautogui",
        "time.sleep(86400)",
        ("0..60 seconds",),
    ),
    Bad(
        "pyautogui-no-code",
        "pyautogui",
        "I think the task is impossible.",
        ("no pyautogui code",),
    ),
    Bad(
        "pyautogui-nothing",
        "pyautogui",
        "   ",
        ("no pyautogui code",),
    ),
]


def _j(action: str, x: object = 0, y: object = 0, text: str = "", thought: str = "t") -> str:
    import json

    return json.dumps({"thought": thought, "action": action, "x": x, "y": y, "text": text})


# ------------------------------------------------------------------------- JSON action object
# (screen pixels by default: the text observation gives window geometry in pixels)
GOOD += [
    Good(
        "json-type",
        "json",
        _j("type", text="hello from smollm2\n", thought="The xterm has focus."),
        (gui.KeyboardType("hello from smollm2\n"),),
        thought="The xterm has focus.",
    ),
    Good("json-hotkey-space", "json", _j("hotkey", text="ctrl c"), (gui.KeyboardHotkey("ctrl+c"),)),
    Good(
        "json-hotkey-plus",
        "json",
        _j("hotkey", text="ctrl+shift+t"),
        (gui.KeyboardHotkey("ctrl+shift+t"),),
    ),
    Good("json-hotkey-enter", "json", _j("hotkey", text="enter"), (gui.KeyboardHotkey("Return"),)),
    Good("json-click", "json", _j("click", 100, 200), (gui.MouseClick(P(100, 200)),)),
    Good("json-click-float", "json", _j("click", 100.4, 199.6), (gui.MouseClick(P(100, 200)),)),
    Good(
        "json-click-edge-clamped", "json", _j("click", 1920, 1080), (gui.MouseClick(P(1919, 1079)),)
    ),
    Good(
        "json-click-relative-space",
        "json",
        _j("click", 500, 500),
        (gui.MouseClick(P(960, 540)),),
        space=REL,
    ),
    Good("json-double-click", "json", _j("double_click", 5, 6), (gui.MouseDoubleClick(P(5, 6)),)),
    Good("json-right-click", "json", _j("right_click", 5, 6), (gui.MouseClick(P(5, 6), R),)),
    Good("json-move", "json", _j("move", 7, 8), (gui.MouseMove(P(7, 8)),)),
    Good("json-scroll-here", "json", _j("scroll", text="up"), (gui.MouseScroll(gui.HERE, -5),)),
    Good(
        "json-scroll-at", "json", _j("scroll", 10, 20, "right"), (gui.MouseScroll(P(10, 20), 0, 5),)
    ),
    Good("json-wait", "json", _j("wait"), (gui.Wait(2000),)),
    Good("json-finished", "json", _j("finished", text="done"), (gui.Finished("done"),)),
    Good("json-finished-empty", "json", _j("finished"), (gui.Finished(None),)),
    Good("json-failed", "json", _j("failed", text="no terminal"), (gui.Failed("no terminal"),)),
    Good("json-call-user", "json", _j("call_user"), (gui.CallUser(),)),
    Good(
        "json-fenced",
        "json",
        '```json\n{"thought": "x", "action": "wait", "x": 0, "y": 0, "text": ""}\n```',
        (gui.Wait(2000),),
    ),
    Good(
        "json-optional-keys-missing",
        "json",
        '{"action": "type", "text": "a"}',
        (gui.KeyboardType("a"),),
        thought="",
    ),
    Good(
        # A payload is only ever text to type: nothing evaluates it.
        "json-type-code-is-just-text",
        "json",
        _j("type", text="__import__('os').system('touch /tmp/pwned')"),
        (gui.KeyboardType("__import__('os').system('touch /tmp/pwned')"),),
    ),
]

BAD += [
    Bad("json-not-json", "json", "Action: click(point='<point>1 2</point>')", ("not valid json",)),
    Bad(
        "json-unterminated",
        "json",
        '{"thought": "x", "action": "type", "text": "abc',
        ("not valid json",),
    ),
    Bad("json-array", "json", '[{"action": "wait"}]', ("one json object",)),
    Bad("json-unknown-action", "json", _j("explode"), ("must be one of", "type")),
    Bad("json-action-not-string", "json", '{"action": 3}', ("must be one of",)),
    Bad(
        "json-unknown-key",
        "json",
        '{"action": "wait", "__class__": 1}',
        ("unknown key", "__class__"),
    ),
    Bad(
        "json-duplicate-key", "json", '{"action": "wait", "action": "finished"}', ("appears twice",)
    ),
    Bad("json-nan", "json", '{"action": "click", "x": NaN, "y": 1}', ("nan",)),
    Bad("json-infinity", "json", '{"action": "click", "x": Infinity, "y": 1}', ("infinity",)),
    Bad("json-absurd-coordinate", "json", _j("click", 10**9, 5), ("outside the screen",)),
    Bad("json-negative-coordinate", "json", _j("click", -1, 5), ("outside the screen",)),
    Bad("json-coordinate-string", "json", _j("click", "100", 5), ("must be a number",)),
    Bad("json-coordinate-bool", "json", _j("click", True, 5), ("must be a number",)),
    Bad("json-click-no-point", "json", '{"action": "click"}', ('needs "x"',)),
    Bad("json-type-empty", "json", _j("type"), ("needs the text",)),
    Bad("json-text-not-string", "json", '{"action": "type", "text": ["a"]}', ("must be a string",)),
    Bad("json-hotkey-unknown-key", "json", _j("hotkey", text="hyper q"), ("unknown key name",)),
    Bad("json-scroll-bad-direction", "json", _j("scroll", text="sideways"), ("up, down",)),
    Bad("json-deep-nesting", "json", "[" * 30_000 + "]" * 30_000, ("nested too deeply",)),
    Bad("json-empty", "json", "   ", ("not valid json",)),
]
