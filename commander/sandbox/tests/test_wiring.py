"""The command line wires the gui planner, the sandbox tools and the price table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commander import ChatPlanner, CommanderError, GuiPlanner, PriceTable
from commander.__main__ import build_commander, build_parser
from commander._pricing import ModelPrice


def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "LYBIC_API_ENDPOINT",
        "LYBIC_ORG_ID",
        "LYBIC_API_KEY",
        "LYBIC_PRECREATE_SID",
        "COMMANDER_PRICES",
        "COMMANDER_NO_SANDBOX_TOOLS",
    ):
        monkeypatch.delenv(name, raising=False)


def test_sandbox_tools_are_served_once_a_sandbox_api_is_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean(monkeypatch)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"ui-tars*": {"input": 1, "output": 2}}}))
    args = build_parser().parse_args(
        [
            "--sandbox-endpoint",
            "http://127.0.0.1:9",
            "--sandbox-org",
            "ORG",
            "--gui-model",
            "ui-tars-1.5",
            "--gui-coordinates",
            "smart-resize",
            "--prices",
            str(prices),
        ]
    )
    commander = build_commander(args)
    assert "planner:gui" in commander.hello.capabilities
    gui = commander.planners.get("gui")
    assert isinstance(gui, GuiPlanner) and gui.local_tools is not None
    assert gui.settings.model == "ui-tars-1.5" and gui.settings.coordinates == "smart-resize"
    assert gui.settings.prices.cost("ui-tars-1.5", 1_000_000, 0) == (1.0, "USD")
    names = {spec.name for p in commander._tool_providers for spec in p.specs}
    assert "computer.click" in names
    assert "computer.describe_screen" in names
    # The chat planner prices its turns from the same table.
    chat = commander.planners.get("chat")
    assert isinstance(chat, ChatPlanner)
    assert chat.settings.prices.cost("ui-tars-1.5", 1_000_000, 0) == (1.0, "USD")
    # Defaults: observation and format follow the model; a text-only model gets text+json.
    assert (gui.settings.observation, gui.settings.output_format) == ("auto", "auto")
    assert gui.settings.steps == 50
    text = build_commander(
        build_parser().parse_args(
            [
                "--sandbox-endpoint",
                "http://127.0.0.1:9",
                "--gui-observation",
                "both",
                "--gui-output-format",
                "json",
                "--gui-response-format",
                "json-schema",
                "--gui-max-steps",
                "7",
            ]
        )
    ).planners.get("gui")
    assert isinstance(text, GuiPlanner)
    s = text.settings
    assert (s.observation, s.output_format, s.response_format, s.steps) == (
        "both",
        "json",
        "json-schema",
        7,
    )

    off = build_commander(
        build_parser().parse_args(["--sandbox-endpoint", "http://x:1", "--no-sandbox-tools"])
    )
    assert not off._tool_providers
    unconfigured = build_commander(build_parser().parse_args([]))
    assert not unconfigured._tool_providers


def test_price_table(tmp_path: Path) -> None:
    table = PriceTable()
    assert table.cost("smollm2-135m", 10, 10) == (0.0, "USD")
    assert table.cost("unknown-model", 10, 10) == (0.0, "")
    toml = tmp_path / "p.toml"
    toml.write_text(
        '[models."doubao-*"]\ninput = 1\noutput = 1\ncurrency = "CNY"\n'
        '[models."doubao-1-5-ui-tars*"]\ninput = 3.5\noutput = 12\ncurrency = "CNY"\n'
    )
    loaded = PriceTable.load(toml)
    assert loaded.cost("Doubao-1-5-UI-TARS-250428", 1_000_000, 1_000_000) == (15.5, "CNY")
    assert loaded.cost("doubao-seed", 1_000_000, 0) == (1.0, "CNY")
    assert loaded.extend({"doubao-seed": ModelPrice(9, 9, "CNY")}).cost(
        "doubao-seed", 1_000_000, 0
    ) == (9.0, "CNY")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"m": {"input": "x"}}}))
    with pytest.raises(CommanderError, match="numeric"):
        PriceTable.load(bad)
