"""Fixtures: the fake dispatcher, the scripted model server, a commander factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from commander import Commander, ConnectionConfig, LLMSettings
from commander.tests.fakes import DispatcherServer, ScriptedLLM


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # grpc.aio runs on asyncio only, and binds its completion queue to one event
    # loop: with a loop per test, an event of the previous test's (closed) loop
    # can still arrive under load ("Event loop is closed"). One loop for the
    # session, as grpc.aio expects.
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
async def one_event_loop(anyio_backend: str) -> AsyncIterator[None]:
    """Holds anyio's test runner (and so its event loop) open for the whole session."""
    yield


@pytest.fixture
async def dispatcher() -> AsyncIterator[DispatcherServer]:
    server = DispatcherServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def llm() -> AsyncIterator[ScriptedLLM]:
    server = ScriptedLLM()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


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
