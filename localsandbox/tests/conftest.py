"""Fixtures: a real local sandbox server process (see :mod:`localsandbox.tests.harness`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localsandbox.tests.harness import LocalServer, start_server, x11_tools

__all__ = ["x11_tools"]  # a fixture, used by the tests of this directory


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server(x11_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    srv = start_server(tmp_path_factory.mktemp("localsandbox"), "--process-timeout", "3")
    try:
        yield srv
    finally:
        srv.stop()
