"""Fixtures: a commander factory (the fake dispatcher and model: commander/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from commander import Commander, ConnectionConfig, LLMSettings
from commander.tests.fakes import DispatcherServer, ScriptedLLM


def fast_connection(target: str, **kw: Any) -> ConnectionConfig:
    """Quick reconnects and handshakes, for tests."""
    settings: dict[str, Any] = {
        "reconnect_initial": 0.05,
        "reconnect_max": 0.3,
        "handshake_timeout": 2.0,
        **kw,
    }
    return ConnectionConfig(target=target, **settings)


@pytest.fixture
def make_commander(dispatcher: DispatcherServer, llm: ScriptedLLM) -> Callable[..., Commander]:
    def make(**kw: Any) -> Commander:
        kw.setdefault("slots", 1)
        kw.setdefault("llm", LLMSettings(base_url=llm.base_url, model="test-model"))
        kw.setdefault("shutdown_grace", 1.0)
        return Commander(fast_connection(dispatcher.target), **kw)

    return make
