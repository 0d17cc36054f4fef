"""Issue 12, class 8: parsing model output takes bounded time and fails only one way.

Each test here was run against the parser before the fix and failed there: the fence
inputs took seconds to hours (the JSON one was cubic, the pyautogui one quadratic),
huge integers raised ValueError / OverflowError, a repeated keyword was accepted with
the last value winning, escaped NUL, controls and lone surrogates were typed, an
unexpected exception escaped the parser, and the planner parsed on the event loop.

Times are this thread's CPU time (``time.thread_time``), the least of a few runs: the
parser's own cost, whatever else the machine is doing. The bounds are ~10x what the
parser takes, and the scaling check compares each input with one 16 times smaller.
"""

from __future__ import annotations

import pytest

from commander.gui import OutputFormat, ParseError, parse_model_output
from commander.gui._common import MAX_OUTPUT_CHARS
from commander.gui.tests.adversarial import FAMILIES, SCREEN, Family, cpu_seconds_to_parse

#: CPU seconds an input at the size cap may take to parse (the worst measured is ~40 ms).
AT_CAP_CPU = 0.5


def parse_error(text: str, fmt: OutputFormat) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_model_output(text, output_format=fmt, screen=SCREEN)
    # The parser's own error, not the catch-all's: no other exception was raised inside.
    assert info.value.__cause__ is None
    return info.value


# --- bounded time --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        # The figures: 1,500 newlines took 1 s, 3,000 took 8.5 s (cubic).
        ("json", "```" + "\n" * 1500 + "x"),
        ("json", "```json" + "\n" * 3000 + "```x"),
        # 63k spaces after a fence took 20 s (quadratic).
        ("pyautogui", "```" + " " * 63_000),
    ],
    ids=["json-1500-newlines", "json-3000-newlines", "pyautogui-63k-spaces"],
)
def test_the_reported_fence_inputs_parse_at_once(fmt: OutputFormat, text: str) -> None:
    seconds, outcome = cpu_seconds_to_parse(text, fmt, runs=1)
    assert outcome == "ParseError"
    assert seconds < 0.1


@pytest.mark.parametrize("family", FAMILIES, ids=[f.id for f in FAMILIES])
def test_adversarial_input_at_the_size_cap_parses_in_bounded_linear_time(family: Family) -> None:
    big = family.make(MAX_OUTPUT_CHARS)[:MAX_OUTPUT_CHARS]
    small = family.make(MAX_OUTPUT_CHARS // 16)[: MAX_OUTPUT_CHARS // 16]
    big_seconds, _ = cpu_seconds_to_parse(big, family.fmt)
    small_seconds, _ = cpu_seconds_to_parse(small, family.fmt)
    assert big_seconds < AT_CAP_CPU, f"{family.id}: {big_seconds * 1000:.1f} ms"
    # Linear: 16 times the input, about 16 times the time (quadratic would be
    # 256). The slack covers families whose small input is rejected at once
    # (~0 ms) while the big one takes tens of ms of thread CPU on a loaded
    # CI machine (57 ms seen against 50 ms of slack); a quadratic blow-up at
    # the cap is seconds (the reported 63k spaces: 20 s).
    assert big_seconds < 64 * small_seconds + 0.1, (
        f"{family.id}: {big_seconds * 1000:.1f} ms at {len(big)} chars, "
        f"{small_seconds * 1000:.1f} ms at {len(small)}"
    )


def test_the_families_reach_the_size_cap() -> None:
    for family in FAMILIES:
        assert len(family.make(MAX_OUTPUT_CHARS)) >= MAX_OUTPUT_CHARS - 100, family.id


# --- one error type ------------------------------------------------------------

HUGE = "0x" + "f" * 4000  # 4,816 decimal digits: str() of it raises ValueError


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("json", '{"action": "click", "x": ' + "1" * 5000 + ', "y": 1}'),
        ("json", '{"action": "type", "thought": ' + "1" * 5000 + "}"),
        ("pyautogui", f"pyautogui.click({HUGE}, 1)"),
        ("pyautogui", f"pyautogui.scroll({HUGE})"),
        ("pyautogui", f"pyautogui.move(-{HUGE}, 1)"),
        ("pyautogui", f"time.sleep({HUGE})"),
        ("pyautogui", f"pyautogui.click(1, 1, button={HUGE})"),
        ("ui-tars", f"Action: click(point=({HUGE}, 1))"),
        ("ui-tars", f"Action: type(content={HUGE})"),
    ],
)
def test_huge_integers_are_a_parse_error(fmt: OutputFormat, text: str) -> None:
    assert "more than 15 digits" in str(parse_error(text, fmt))


def test_an_unexpected_exception_inside_becomes_a_parse_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from commander.gui import _uitars

    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug in a handler")

    monkeypatch.setitem(_uitars._HANDLERS, "wait", broken)
    with pytest.raises(ParseError) as info:
        parse_model_output("Action: wait()", output_format="ui-tars", screen=SCREEN)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "could not be read" in str(info.value)


def test_a_parse_error_message_is_always_storable() -> None:
    # Lone surrogates and NUL would break the protobuf event and PostgreSQL text.
    message = ParseError("bad \ud800 and \x00", fragment="\udfff").message
    message.encode("utf-8")
    assert "\x00" not in message


def test_programming_errors_stay_value_errors() -> None:
    # Not model output: the caller's own mistake.
    with pytest.raises(ValueError, match="unknown output format"):
        parse_model_output("x", output_format="yaml", screen=SCREEN)  # type: ignore[arg-type]


# --- repeated keywords ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "text", "name"),
    [
        ("ui-tars", "Action: type(content='ls', content='rm -rf ~')", "content"),
        (
            "ui-tars",
            "Action: click(point='<point>1 2</point>', point='<point>3 4</point>')",
            "point",
        ),
        ("pyautogui", "pyautogui.write(message='ls', message='rm -rf ~')", "message"),
        ("pyautogui", "pyautogui.click(x=1, y=2, x=3)", "x"),
    ],
)
def test_a_repeated_keyword_is_refused_as_python_refuses_it(
    fmt: OutputFormat, text: str, name: str
) -> None:
    assert f"keyword argument repeated: {name}" in str(parse_error(text, fmt))


# --- what may be typed ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "text", "kind"),
    [
        ("ui-tars", "Action: type(content='a\\x00b')", "control character"),
        ("ui-tars", "Action: type(content='a\\0')", "control character"),
        ("ui-tars", "Action: type(content='a\\ud800b')", "lone surrogate"),
        ("ui-tars", "Action: type(content='\\x1b[31m')", "control character"),
        ("ui-tars", "Action: type(content='a\\x7f')", "control character"),
        ("ui-tars", "Action: type(content='a\\x85')", "control character"),
        ("ui-tars", "Action: finished(content='done\\udc80')", "lone surrogate"),
        ("pyautogui", "pyautogui.write('a\\x00')", "control character"),
        ("pyautogui", "pyautogui.write(['a', '\\x00'])", "control character"),
        ("pyautogui", "pyautogui.typewrite('\\udfff')", "lone surrogate"),
        ("json", '{"action": "type", "text": "a\\u0000b"}', "control character"),
        ("json", '{"action": "type", "text": "a\\ud800b"}', "lone surrogate"),
        ("json", '{"action": "finished", "text": "\\u001b"}', "control character"),
        ("json", '{"action": "wait", "thought": "\\ud800"}', "lone surrogate"),
        ("json", '{"action": "wait", "thought": "\\u0000"}', "control character"),
    ],
)
def test_controls_and_surrogates_are_never_typed_or_reported(
    fmt: OutputFormat, text: str, kind: str
) -> None:
    assert kind in str(parse_error(text, fmt))


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("ui-tars", "Thought: \ud800\nAction: wait()"),
        ("pyautogui", "I act \udc00\npyautogui.press('a')"),
        ("json", '{"action": "wait", "thought": "\ud800"}'),
    ],
)
def test_a_raw_lone_surrogate_in_the_output_is_refused(fmt: OutputFormat, text: str) -> None:
    # It would reach the thought, a StageChange event, and break its serialisation.
    assert "lone surrogate" in str(parse_error(text, fmt))


def test_newlines_and_tabs_are_still_typed() -> None:
    out = parse_model_output(
        "Action: type(content='a\\tb\\nc\n')", output_format="ui-tars", screen=SCREEN
    )
    assert [a.content for a in out.actions] == ["a\tb\nc\n"]  # type: ignore[union-attr]


def test_control_keys_are_still_pressed() -> None:
    # Key names are not typed text: press('\n') is the Return key.
    out = parse_model_output(
        "pyautogui.press('\\n')\npyautogui.press('\\t')", output_format="pyautogui", screen=SCREEN
    )
    assert [a.keys for a in out.actions] == ["Return", "Tab"]  # type: ignore[union-attr]
