"""Fixtures of the planner tests: one event loop, the fake dispatcher, the scripted model."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from commander.tests.fakes import DispatcherServer, ScriptedLLM


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # grpc.aio binds to one event loop: one loop for the session (as commander/tests).
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
async def one_event_loop(anyio_backend: str) -> AsyncIterator[None]:
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
