"""Runs the corpus in cases.py: every good output parses to exactly its actions,
every bad one raises ParseError with a message that says what was wrong."""

from __future__ import annotations

import pytest

from commander.gui import ParseError, parse_model_output
from commander.gui.tests.cases import BAD, GOOD, SCREEN, Bad, Good


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_good_output_parses_to_its_actions(case: Good) -> None:
    out = parse_model_output(case.text, output_format=case.fmt, screen=SCREEN, space=case.space)
    assert out.actions == case.actions
    if case.thought is not None:
        assert out.thought == case.thought
    if case.reflection is not None:
        assert out.reflection == case.reflection


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_output_is_a_parse_error_that_says_why(case: Bad) -> None:
    with pytest.raises(ParseError) as info:
        parse_model_output(case.text, output_format=case.fmt, screen=SCREEN, space=case.space)
    message = str(info.value).lower()
    for words in case.says:
        assert words.lower() in message, f"{words!r} not in {message!r}"
    feedback = info.value.feedback()
    assert "nothing was executed" in feedback.lower()
    assert str(info.value) in feedback


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in GOOD] + [c.id for c in BAD]
    assert len(ids) == len(set(ids))


def test_corpus_covers_every_action_of_both_formats() -> None:
    from commander.gui._pyautogui import FUNCTION_NAMES
    from commander.gui._uitars import ACTION_NAMES

    uitars_text = " ".join(c.text for c in GOOD if c.fmt == "ui-tars")
    for name in ACTION_NAMES:
        assert f"{name}(" in uitars_text, f"no good UI-TARS case for {name}"
    pyautogui_text = " ".join(c.text for c in GOOD if c.fmt == "pyautogui")
    for name in FUNCTION_NAMES:
        if name in ("position", "moveRel"):
            continue
        assert f"pyautogui.{name}(" in pyautogui_text, f"no good pyautogui case for {name}"


def test_corpus_covers_every_json_action() -> None:
    import json

    from commander.gui import JSON_ACTIONS

    seen = set()
    for case in GOOD:
        if case.fmt == "json":
            body = case.text.strip().removeprefix("```json").removesuffix("```")
            seen.add(json.loads(body)["action"])
    assert seen == set(JSON_ACTIONS)


def test_json_schema_names_exactly_the_parsed_keys_and_actions() -> None:
    from commander.gui import JSON_ACTION_SCHEMA, JSON_ACTIONS

    assert JSON_ACTION_SCHEMA["properties"]["action"]["enum"] == list(JSON_ACTIONS)
    assert set(JSON_ACTION_SCHEMA["required"]) == set(JSON_ACTION_SCHEMA["properties"])
