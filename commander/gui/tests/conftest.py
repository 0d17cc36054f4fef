"""Fixtures of the GUI planner tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from commander import Commander, ConnectionConfig
from commander.gui._planner import GuiPlanner, GuiSettings
from commander.tests.fakes import DispatcherServer, FakeSlot, ScriptedLLM


@pytest.fixture
async def make(dispatcher: DispatcherServer, llm: ScriptedLLM) -> AsyncIterator[Any]:
    commanders: list[Commander] = []

    async def start(**settings: Any) -> FakeSlot:
        settings.setdefault("base_url", llm.base_url)
        settings.setdefault("model", "ui-tars-test")
        settings.setdefault("settle_seconds", 0)
        commander = Commander(
            ConnectionConfig(target=dispatcher.target, reconnect_initial=0.05),
            slots=1,
            planners={"gui": GuiPlanner(GuiSettings(**settings))},
            shutdown_grace=0.5,
        )
        await commander.__aenter__()
        commanders.append(commander)
        return await dispatcher.servicer.next_slot()

    yield start
    for commander in commanders:
        await commander.__aexit__(None, None, None)
