"""The HTTP layer in memory (no X server): auth, error shape, validation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from localsandbox import SandboxManager, create_app

pytestmark = pytest.mark.anyio

KEY = "secret-key"


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    manager = SandboxManager(tmp_path / "state")  # not entered: no sandbox can be created
    app = create_app(manager, api_key=KEY, org_id="ORG-1")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
        yield client


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "missing x-api-key header"),
        ({"x-api-key": "nope"}, 401, "invalid API key"),
        ({"x-api-key": KEY[:-1]}, 401, "invalid API key"),
    ],
)
async def test_requests_without_the_key_are_refused(
    http: httpx.AsyncClient, headers: dict[str, str], status: int, message: str
) -> None:
    r = await http.get("/api/orgs/ORG-1/sandboxes", headers=headers)
    assert r.status_code == status
    assert r.json() == {"code": "UNAUTHORIZED", "message": message}


async def test_other_organisations_are_forbidden(http: httpx.AsyncClient) -> None:
    r = await http.get("/api/orgs/ORG-2/sandboxes", headers={"x-api-key": KEY})
    assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN"


async def test_listing_and_unknown_sandbox(http: httpx.AsyncClient) -> None:
    h = {"x-api-key": KEY}
    r = await http.get("/api/orgs/ORG-1/sandboxes", headers=h)
    assert r.status_code == 200 and r.json() == []
    r = await http.get("/api/orgs/ORG-1/sandboxes/SBX-nope", headers=h)
    assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
    r = await http.post(
        "/api/orgs/ORG-1/sandboxes/SBX-nope/actions/execute",
        headers=h,
        json={"action": {"type": "screenshot"}},
    )
    assert r.status_code == 404


async def test_invalid_bodies_are_bad_requests(http: httpx.AsyncClient) -> None:
    h = {"x-api-key": KEY}
    r = await http.post("/api/orgs/ORG-1/sandboxes", headers=h, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
    r = await http.post("/api/orgs/ORG-1/sandboxes", headers=h, json={"name": "x"})
    assert r.status_code == 400 and "shape: Field required" in r.json()["message"]
    r = await http.post("/api/orgs/ORG-1/sandboxes", headers=h, json={"shape": "local-99999x1"})
    assert r.status_code == 400 and "unknown shape" in r.json()["message"]
    r = await http.post(
        "/api/orgs/ORG-1/sandboxes",
        headers=h,
        content=b"[" * 10 + b"]" * 10,
    )
    assert r.status_code == 400


async def test_health_and_shapes(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    r = await http.get("/api/orgs/ORG-1/shapes", headers={"x-api-key": KEY})
    assert r.status_code == 200
    assert {s["name"] for s in r.json()} >= {"local-1280x720", "local-1920x1080"}
