"""Structured logs: the --log-format flag and the JSON lines."""

from __future__ import annotations

import io
import json
import logging

import pytest

from commander.__main__ import build_parser
from commander._logging import JsonFormatter, session_ids, setup_logging
from commander.tools_main import build_parser as build_tools_parser


def test_log_format_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    assert build_parser().parse_args([]).log_format == "text"
    assert build_tools_parser().parse_args([]).log_format == "text"
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert build_parser().parse_args([]).log_format == "json"
    assert build_tools_parser().parse_args([]).log_format == "json"
    assert build_parser().parse_args(["--log-format", "TEXT"]).log_format == "text"
    with pytest.raises(SystemExit):
        build_tools_parser().parse_args(["--log-format", "xml"])


def capture() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("commander.test-json")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def lines(out: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_session_ids() -> None:
    logger, out = capture()
    logger.info("no session %s", "yet")
    token = session_ids.set(("task-9", "sess-9"))
    try:
        logger.warning("in a session")
    finally:
        session_ids.reset(token)
    adapter = logging.LoggerAdapter(logger, {"task_id": "task-1", "session_id": "sess-1"})
    adapter.info("from the planner's logger")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    first, second, third, fourth = lines(out)
    assert first["message"] == "no session yet" and first["level"] == "INFO"
    assert first["logger"] == "commander.test-json" and first["time"].endswith("+00:00")
    assert "task_id" not in first and "session_id" not in first
    assert (second["task_id"], second["session_id"], second["level"]) == (
        "task-9",
        "sess-9",
        "WARNING",
    )
    assert (third["task_id"], third["session_id"]) == ("task-1", "sess-1")
    assert "ValueError: boom" in fourth["exception"]
    assert "task_id" not in fourth


def test_json_lines_hold_only_the_known_fields() -> None:
    logger, out = capture()
    # other attributes of a record (an extra= someone passed) are never written
    logger.info("hello", extra={"api_key": "sk-must-not-leak"})
    (line,) = lines(out)
    assert set(line) == {"time", "level", "logger", "message"}
    assert "must-not-leak" not in out.getvalue()


def test_setup_logging_json() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        setup_logging("DEBUG", "json")
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
        root.handlers = []
        setup_logging("INFO", "text")
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers, level = saved
        root.setLevel(level)
