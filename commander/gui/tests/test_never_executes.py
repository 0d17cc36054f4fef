"""The parser never executes model output.

Two proofs: (1) while the whole corpus is parsed, eval and exec fail loudly
and compile may only build syntax trees; (2) payloads that create a file when
executed — checked by executing one on purpose — leave no file behind when
parsed, in every injection shape of both formats. Plus: hostile sizes and
nesting end in a ParseError quickly, never a crash or a hang.
"""

from __future__ import annotations

import ast
import builtins
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from commander.gui import OutputFormat, ParseError, parse_model_output
from commander.gui.tests.cases import BAD, GOOD, SCREEN, Bad, Good

_real_compile = builtins.compile


@pytest.fixture
def no_execution(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """eval/exec raise; compile is allowed only with PyCF_ONLY_AST (what ast.parse uses)."""
    compiled: list[str] = []

    def forbidden(name: str) -> Callable[..., Any]:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"the parser called {name}()")

        return fail

    def ast_only_compile(
        source: Any, filename: Any, mode: str, flags: int = 0, *a: Any, **kw: Any
    ) -> Any:
        if not flags & ast.PyCF_ONLY_AST:
            raise AssertionError("the parser compiled code to bytecode")
        compiled.append(mode)
        return _real_compile(source, filename, mode, flags, *a, **kw)

    monkeypatch.setattr(builtins, "eval", forbidden("eval"))
    monkeypatch.setattr(builtins, "exec", forbidden("exec"))
    monkeypatch.setattr(builtins, "compile", ast_only_compile)
    yield compiled


def test_whole_corpus_parses_without_eval_exec_or_bytecode(no_execution: list[str]) -> None:
    cases: list[Good | Bad] = [*GOOD, *BAD]
    for case in cases:
        try:
            parse_model_output(case.text, output_format=case.fmt, screen=SCREEN, space=case.space)
        except ParseError:
            pass
    assert no_execution, "the guard saw no ast.parse at all; it is not guarding anything"


# Shapes of injection, with {P} standing for a Python expression that creates a file.
UITARS_SHAPES = [
    "Action: type(content=''); {P} #')",
    "Action: type(content='')\n{P}",
    'Action: type(content=f"{{{P}}}")',
    "Action: type(content={P})",
    "Action: click(point={P})",
    "Action: click(point='<point>1 2</point>', element_info={P})",
    "Action: type(content=(lambda: {P})())",
    "Action: type(content=[{P} for _ in 'a'])",
    "Action: type(content=str({P}))",
    "Action: finished(content='done'); {P}",
    "Thought: {P}\nAction: {P}",
    "{P}",
]
PYAUTOGUI_SHAPES = [
    "{P}",
    "pyautogui.write({P})",
    'pyautogui.write(f"{{{P}}}")',
    "pyautogui.click(1, 1); {P}",
    "pyautogui.click(1, 1)\n{P}",
    "```python\nimport pyautogui\n{P}\n```",
    "import os\n{P}",
    "x = {P}",
    "if True:\n    {P}",
    "pyautogui.moveTo(1, 1, tween={P})",
    "pyautogui.hotkey(*[{P}])",
    "pyautogui.press(**{{'keys': {P}}})",
    "time.sleep({P})",
    "DONE\n{P}",
]


def payloads(mark: Path) -> list[str]:
    m = str(mark)
    return [
        f"__import__('pathlib').Path({m!r}).touch()",
        f"open({m!r}, 'w').close()",
        f"__import__('os').system('touch {m}')",
        f"__builtins__['exec'](\"open({m!r}, 'w').close()\")",
    ]


def _all_inputs(mark: Path) -> list[tuple[OutputFormat, str]]:
    out: list[tuple[OutputFormat, str]] = []
    for p in payloads(mark):
        out += [
            ("ui-tars", s.replace("{P}", p).replace("{{", "{").replace("}}", "}"))
            for s in UITARS_SHAPES
        ]
        out += [
            ("pyautogui", s.replace("{P}", p).replace("{{", "{").replace("}}", "}"))
            for s in PYAUTOGUI_SHAPES
        ]
    return out


def test_payloads_are_live_when_executed(tmp_path: Path) -> None:
    # The control: each payload really creates the file when executed, so the
    # next test's "no file" means "not executed", not "harmless payload".
    for i, p in enumerate(payloads(tmp_path / "x")):
        mark = tmp_path / f"control{i}"
        expr = p.replace(str(tmp_path / "x"), str(mark))
        exec(expr, {"__builtins__": builtins.__dict__})  # the test executes it, on purpose
        assert mark.exists(), expr


def test_injected_payloads_never_run(tmp_path: Path, no_execution: list[str]) -> None:
    mark = tmp_path / "pwned"
    inputs = _all_inputs(mark)
    errors = 0
    for fmt, text in inputs:
        try:
            out = parse_model_output(text, output_format=fmt, screen=SCREEN)
        except ParseError as exc:
            errors += 1
            assert exc.feedback()
        else:  # pragma: no cover - every shape above is invalid
            pytest.fail(f"accepted an injection: {text!r} -> {out.actions}")
        assert not mark.exists(), f"payload ran for {text!r}"
    assert errors == len(inputs)


@pytest.mark.parametrize(
    ("fmt", "text", "says"),
    [
        ("ui-tars", "Action: type(content='" + "a" * 100_000 + "')", "characters long"),
        ("pyautogui", "pyautogui.write('" + "a" * 100_000 + "')", "characters long"),
        ("ui-tars", "Action: type(content='" + "a" * 20_000 + "')", "characters long"),
        ("ui-tars", "Action: type(content='" + "a" * 12_000 + "')", "at most 10000"),
        ("ui-tars", "Action: click(point=" + "(" * 5000 + "1" + ")" * 5000 + ")", "syntax"),
        ("ui-tars", "Action: click(point=" + "[" * 50 + "1" + "]" * 50 + ")", "nested"),
        ("pyautogui", "pyautogui.click(" + "(" * 5000 + ")" * 5000 + ")", "syntax"),
        ("pyautogui", "-" * 50_000 + "1", "no pyautogui code"),
        ("pyautogui", "pyautogui.typewrite([" + "'a'," * 500 + "])", "64 elements"),
        ("ui-tars", "Action: " + "wait()\n" * 40, "at most 32"),
        ("pyautogui", "pyautogui.press('a')\n" * 40, "at most 32"),
        ("pyautogui", "pyautogui.press('a', presses=50)", "at most 32"),
        ("ui-tars", "Action: type(content='\x00')", "nul"),
        ("ui-tars", "Action: " + "(" * 60_000, "expected an action"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_hostile_sizes_fail_fast(fmt: OutputFormat, text: str, says: str) -> None:
    start = time.monotonic()
    with pytest.raises(ParseError) as info:
        parse_model_output(text, output_format=fmt, screen=SCREEN)
    assert time.monotonic() - start < 2.0
    assert says in str(info.value).lower()
    assert len(str(info.value)) < 600, "the message for the model must stay short"
