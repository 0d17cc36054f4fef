"""The example toolset: workspace file tools confined to one folder, and text.sha256."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from commander import InvalidToolArgumentsError, ToolExecutionError, workspace_provider
from commander._workspace import MAX_WRITE_BYTES

pytestmark = pytest.mark.anyio


async def test_write_read_list(tmp_path: Path) -> None:
    tools = workspace_provider(tmp_path / "ws")
    written = await tools.call("workspace.write_file", {"path": "notes/a.txt", "content": "héllo"})
    assert written == {"path": "notes/a.txt", "bytes_written": 6, "size": 6}
    await tools.call(
        "workspace.write_file", {"path": "notes/a.txt", "content": "!", "append": True}
    )
    read = await tools.call("workspace.read_file", {"path": "notes/a.txt"})
    assert read == {"path": "notes/a.txt", "content": "héllo!", "size": 7, "truncated": False}
    partial = await tools.call("workspace.read_file", {"path": "notes/a.txt", "max_bytes": 2})
    assert partial["truncated"] is True and partial["content"] == "h\ufffd"

    listing = await tools.call("workspace.list_files", {})
    assert listing == {
        "path": ".",
        "entries": [{"path": "notes", "type": "directory"}],
        "truncated": False,
    }
    deep = await tools.call("workspace.list_files", {"path": ".", "recursive": True})
    assert [e["path"] for e in deep["entries"]] == ["notes", "notes/a.txt"]
    assert (tmp_path / "ws" / "notes" / "a.txt").read_text("utf-8") == "héllo!"


@pytest.mark.parametrize(
    "path",
    ["../outside.txt", "a/../../outside.txt", "/etc/passwd", "", "bad\x00name"],
)
async def test_paths_outside_the_workspace_are_refused(tmp_path: Path, path: str) -> None:
    tools = workspace_provider(tmp_path / "ws")
    with pytest.raises(InvalidToolArgumentsError):
        await tools.call("workspace.write_file", {"path": path, "content": "x"})
    with pytest.raises(InvalidToolArgumentsError):
        await tools.call("workspace.read_file", {"path": path})
    assert not (tmp_path / "outside.txt").exists()


async def test_symlinks_leading_out_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    ws = tmp_path / "ws"
    ws.mkdir()
    os.symlink(secret, ws / "link.txt")
    os.symlink(tmp_path, ws / "up")
    tools = workspace_provider(ws)
    with pytest.raises(InvalidToolArgumentsError, match="escapes"):
        await tools.call("workspace.read_file", {"path": "link.txt"})
    with pytest.raises(InvalidToolArgumentsError, match="escapes"):
        await tools.call("workspace.write_file", {"path": "up/secret.txt", "content": "pwned"})
    assert secret.read_text() == "top secret"


async def test_limits_and_missing_files(tmp_path: Path) -> None:
    tools = workspace_provider(tmp_path)
    with pytest.raises(InvalidToolArgumentsError, match="limit"):
        await tools.call(
            "workspace.write_file", {"path": "big", "content": "x" * (MAX_WRITE_BYTES + 1)}
        )
    with pytest.raises(ToolExecutionError, match="no such file"):
        await tools.call("workspace.read_file", {"path": "missing.txt"})
    with pytest.raises(InvalidToolArgumentsError, match="not a directory"):
        await tools.call("workspace.write_file", {"path": "f", "content": ""})
        await tools.call("workspace.list_files", {"path": "f"})


async def test_sha256(tmp_path: Path) -> None:
    tools = workspace_provider(tmp_path)
    digest = await tools.call("text.sha256", {"text": "abc"})
    assert digest == {"sha256": hashlib.sha256(b"abc").hexdigest()}


def test_specs_mark_side_effects(tmp_path: Path) -> None:
    specs = {s.name: s for s in workspace_provider(tmp_path).specs}
    assert set(specs) == {
        "workspace.write_file",
        "workspace.read_file",
        "workspace.list_files",
        "text.sha256",
    }
    assert specs["workspace.write_file"].side_effects
    assert not specs["workspace.read_file"].side_effects
    schema = json.loads(specs["workspace.write_file"].parameters_json_schema)
    assert schema["required"] == ["path", "content"]
    assert schema["properties"]["append"] == {"type": "boolean"}


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("workspace.write_file", {"path": "a" * 5000, "content": "x"}),
        ("workspace.write_file", {"path": "a/" * 3000 + "f", "content": "x"}),
        ("workspace.read_file", {"path": "b" * 5000}),
        ("workspace.list_files", {"path": "c" * 5000}),
    ],
)
async def test_os_errors_are_the_tools_error_without_the_host_path(
    tmp_path: Path, tool: str, arguments: dict[str, object]
) -> None:
    """An OS limit on a path inside the root (a name too long) is the tool's
    INVALID_ARGUMENTS naming the path as given, never the host's absolute path
    (the OSError's own text), which would tell the model where the workspace is."""
    root = tmp_path / "ws"
    tools = workspace_provider(root)
    with pytest.raises(InvalidToolArgumentsError) as caught:
        await tools.call(tool, arguments)
    message = str(caught.value)
    assert str(root) not in message and str(tmp_path) not in message, message


async def test_each_tenant_has_its_own_workspace(tmp_path: Path) -> None:
    """One provider serves every tenant's tasks: a file one tenant's task writes
    is not there for another tenant's (nor for the default tenant's, whose
    workspace is the root itself, as without tenants)."""
    from commander._provider import CallContext

    tools = workspace_provider(tmp_path / "ws")
    a = CallContext(task_id="t-a", tenant="team-a")
    b = CallContext(task_id="t-b", tenant="team-b")
    default = CallContext(task_id="t-0")
    await tools.call("workspace.write_file", {"path": "secret.txt", "content": "a's"}, context=a)
    assert (await tools.call("workspace.read_file", {"path": "secret.txt"}, context=a))[
        "content"
    ] == "a's"
    for other in (b, default):
        with pytest.raises(ToolExecutionError, match="no such file"):
            await tools.call("workspace.read_file", {"path": "secret.txt"}, context=other)
        listing = await tools.call(
            "workspace.list_files", {"path": ".", "recursive": True}, context=other
        )
        assert listing["entries"] == []
    await tools.call("workspace.write_file", {"path": "d.txt", "content": "0"}, context=default)
    assert (tmp_path / "ws" / "d.txt").read_text("utf-8") == "0"
    assert not (tmp_path / "ws" / "secret.txt").exists()


async def test_a_tenant_name_that_is_no_name_is_refused(tmp_path: Path) -> None:
    from commander._provider import CallContext

    tools = workspace_provider(tmp_path / "ws")
    for name in ("..", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(ToolExecutionError):
            await tools.call(
                "workspace.list_files", {}, context=CallContext(task_id="t", tenant=name)
            )
    assert _names(tmp_path) == ["ws"]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
