"""Adversarial model outputs for the parser's time bound, as data, at any size.

Each family builds an output of about ``n`` characters from a shape that made a
regex or a scanner of the parser (or one like it) backtrack: a fence followed by
blanks or newlines, long runs of one character, deep nesting, many quotes, many
headers. ``python -m commander.gui.tests.adversarial [n]`` prints the parse time
of each at ``n`` (default: the size cap), for the figures in docs/reliability.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from commander.gui import OutputFormat, ParseError, ScreenSize, parse_model_output
from commander.gui._common import MAX_OUTPUT_CHARS
from commander.gui._literal import MAX_SOURCE

SCREEN = ScreenSize(1920, 1080)


@dataclass(frozen=True)
class Family:
    id: str
    fmt: OutputFormat
    make: Callable[[int], str]


def _fit(unit: str, n: int) -> int:
    return max(1, n // len(unit))


FAMILIES: list[Family] = [
    # --- JSON: the fence regex was cubic in the newlines after a fence.
    Family("json-fence-newlines", "json", lambda n: "```" + "\n" * (n - 4) + "x"),
    Family("json-fence-json-newlines", "json", lambda n: "```json" + "\n" * (n - 11) + "```x"),
    Family("json-fence-blank-lines", "json", lambda n: "```\n" + " \n" * _fit(" \n", n - 8) + "x"),
    Family("json-fences", "json", lambda n: "```\n" * _fit("```\n", n)),
    Family("json-open-brackets", "json", lambda n: "[" * n),
    Family("json-open-objects", "json", lambda n: '{"a":' * _fit('{"a":', n)),
    Family("json-backslashes", "json", lambda n: '"' + "\\" * (n - 1)),
    Family("json-long-number", "json", lambda n: "1" * n),
    Family(
        "json-long-text",
        "json",
        lambda n: (
            '{"thought": "", "action": "type", "x": 0, "y": 0, "text": "' + "a" * (n - 70) + '"}'
        ),
    ),
    # --- pyautogui: the fence regex was quadratic in the blanks after a fence.
    Family("pyautogui-fence-spaces", "pyautogui", lambda n: "```" + " " * (n - 3)),
    Family("pyautogui-fence-tabs-x", "pyautogui", lambda n: "```" + "\t" * (n - 4) + "x"),
    Family(
        "pyautogui-fence-lang-spaces", "pyautogui", lambda n: "```python" + " " * (n - 10) + "x"
    ),
    Family("pyautogui-fences-no-newline", "pyautogui", lambda n: "``` " * _fit("``` ", n)),
    Family("pyautogui-open-fences", "pyautogui", lambda n: "```\n" * _fit("```\n", n)),
    Family("pyautogui-backticks", "pyautogui", lambda n: "`" * n),
    Family("pyautogui-spaces", "pyautogui", lambda n: " " * (n - 1) + "x"),
    Family("pyautogui-newlines", "pyautogui", lambda n: "\n" * (n - 1) + "x"),
    Family(
        "pyautogui-indented-lines", "pyautogui", lambda n: (" " * 99 + "x\n") * _fit(" " * 101, n)
    ),
    Family("pyautogui-open-parens", "pyautogui", lambda n: "pyautogui.click" + "(" * (n - 15)),
    Family("pyautogui-tuple", "pyautogui", lambda n: "1," * _fit("1,", n)),
    Family("pyautogui-statements", "pyautogui", lambda n: "a\n" * _fit("a\n", n)),
    # The most Python the parser hands to ast.parse at once: one block of MAX_SOURCE.
    Family(
        "pyautogui-fenced-tuple",
        "pyautogui",
        lambda n: (
            "```python\npyautogui.click("
            + "1," * ((MAX_SOURCE - 20) // 2)
            + ")\n```"
            + "x" * max(0, n - MAX_SOURCE - 10)
        ),
    ),
    Family(
        "pyautogui-fenced-statements",
        "pyautogui",
        lambda n: "```python\n" + "a\n" * ((MAX_SOURCE - 10) // 2) + "```" + "x" * (n - MAX_SOURCE),
    ),
    Family(
        "pyautogui-code-lines",
        "pyautogui",
        lambda n: "pyautogui.click(1, 2\n" * _fit("pyautogui.click(1, 2\n", n),
    ),
    Family(
        "pyautogui-long-write", "pyautogui", lambda n: "pyautogui.write('" + "a" * (n - 19) + "')"
    ),
    # --- UI-TARS: the hand-written scanner and the header regex.
    Family("uitars-spaces", "ui-tars", lambda n: " " * (n - 1) + "x"),
    Family("uitars-blank-header", "ui-tars", lambda n: "\t" * (n - 8) + "Thought"),
    Family("uitars-headers", "ui-tars", lambda n: "Thought:\n" * _fit("Thought:\n", n)),
    Family("uitars-open-parens", "ui-tars", lambda n: "Action: f" + "(" * (n - 9)),
    Family("uitars-quotes", "ui-tars", lambda n: "Action: f(" + "'" * (n - 10)),
    Family(
        "uitars-apostrophes",
        "ui-tars",
        lambda n: "Action: type(content='" + "a'" * _fit("a'", n - 30) + ")",
    ),
    Family(
        "uitars-apostrophes-blanks",
        "ui-tars",
        lambda n: "Action: type(content='" + "a'   " * _fit("a'   ", n - 30) + ")",
    ),
    Family(
        "uitars-long-type",
        "ui-tars",
        lambda n: "Action: type(content='" + "a" * (n - 24) + "')",
    ),
    Family(
        "uitars-calls",
        "ui-tars",
        lambda n: "Action: " + "type(content='a')\n" * _fit("type(content='a')\n", n - 8),
    ),
    Family(
        "uitars-nested",
        "ui-tars",
        lambda n: "Action: click(point=" + "(" * ((n - 21) // 2) + ")" * ((n - 21) // 2) + ")",
    ),
    # A call of MAX_SOURCE with a syntax error and a quote: read twice (strict, then
    # with apostrophes taken literally), the most ast.parse work a UI-TARS answer gets.
    Family(
        "uitars-tuple-read-twice",
        "ui-tars",
        lambda n: (
            "Thought: "
            + "x" * max(0, n - MAX_SOURCE - 30)
            + "\nAction: click(point=("
            + "1," * ((MAX_SOURCE - 40) // 2)
            + "1 1), x='a')"
        ),
    ),
    Family(
        "uitars-long-thought",
        "ui-tars",
        lambda n: "Thought: " + "x " * _fit("x ", n - 30) + "\nAction: wait()",
    ),
]


def cpu_seconds_to_parse(text: str, fmt: OutputFormat, *, runs: int = 3) -> tuple[float, str]:
    """The least CPU time of this thread over ``runs`` parses of ``text`` (thread CPU
    time and the minimum: robust to other processes and to first-run warm-up), and
    what came of it: "ok" or "ParseError" (anything else propagates)."""
    best = float("inf")
    outcome = ""
    for _ in range(runs):
        start = time.thread_time()
        try:
            parse_model_output(text, output_format=fmt, screen=SCREEN)
            outcome = "ok"
        except ParseError:
            outcome = "ParseError"
        best = min(best, time.thread_time() - start)
    return best, outcome


def main(argv: list[str]) -> None:
    n = int(argv[1]) if len(argv) > 1 else MAX_OUTPUT_CHARS
    for family in FAMILIES:
        text = family.make(n)[:MAX_OUTPUT_CHARS]
        seconds, outcome = cpu_seconds_to_parse(text, family.fmt)
        print(f"{family.id:32s} {len(text):6d} chars {seconds * 1000:9.2f} ms  {outcome}")


if __name__ == "__main__":
    main(sys.argv)
