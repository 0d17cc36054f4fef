"""Fixtures every test package of the commander shares.

One event loop for the whole session, the fake dispatcher and the scripted
model server (see :mod:`commander.tests.fakes`). The conftests of
``commander/tests``, ``commander/gui/tests`` and ``commander/sandbox/tests``
add what only their own tests use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from commander.tests.fakes import DispatcherServer, ScriptedLLM, running


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
    async with running(DispatcherServer()) as server:
        yield server


@pytest.fixture
async def llm() -> AsyncIterator[ScriptedLLM]:
    async with running(ScriptedLLM()) as server:
        yield server


@pytest.fixture
async def other() -> AsyncIterator[ScriptedLLM]:
    """A second scripted model server: an endpoint a task names, not the operator's."""
    async with running(ScriptedLLM()) as server:
        yield server
