"""The example toolset: files confined to one directory, and a text hash.

Tools: ``workspace.write_file``, ``workspace.read_file``,
``workspace.list_files`` and ``text.sha256``. Every path is relative to the
workspace root; absolute paths, ``..`` that climbs out, and symlinks that lead
out are refused with ``INVALID_ARGUMENTS`` before anything is touched.

Each tenant has its own workspace (the provider serves every tenant's tasks,
``Invocation.tenant`` says whose a call is): the default tenant's is the root
itself, tenant ``NAME``'s the sibling folder ``<root>.tenant-NAME``, which no
path of another tenant's can reach.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commander._errors import InvalidToolArgumentsError, ToolExecutionError
from commander._provider import ToolProvider, current_call

#: Largest file ``workspace.write_file`` writes (the message size limit is 4 MiB).
MAX_WRITE_BYTES = 1024 * 1024
#: Default and largest number of bytes ``workspace.read_file`` returns.
DEFAULT_READ_BYTES = 64 * 1024
MAX_READ_BYTES = 1024 * 1024
#: Most entries ``workspace.list_files`` returns.
MAX_LIST_ENTRIES = 1000


#: What a tenant's name may be (the dispatcher's rule): it names a folder.
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: OS errors that say the path the caller gave is wrong (INVALID_ARGUMENTS);
#: any other is the tool failing (EXECUTION_FAILED).
_PATH_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EEXIST}
)


def _fs(path: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a file operation; an ``OSError`` becomes the tool's error, naming the
    path as the caller gave it: never the host's absolute path, which the
    ``OSError``'s own text carries."""
    try:
        return call()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        kind = InvalidToolArgumentsError if exc.errno in _PATH_ERRNOS else ToolExecutionError
        raise kind(f"{path[:200]!r}: {reason}") from None


class Workspace:
    """A directory the tools may touch, and nothing outside it."""

    def __init__(self, root: str | Path) -> None:
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        self.root = path.resolve(strict=True)

    def resolve(self, relative: str) -> Path:
        """The absolute path for ``relative``, refused if it leaves the workspace."""
        if not relative or "\x00" in relative:
            raise InvalidToolArgumentsError("path must be a non-empty relative path")
        candidate = Path(relative)
        if candidate.is_absolute() or candidate.drive:
            raise InvalidToolArgumentsError(f"absolute paths are not allowed: {relative!r}")
        # resolve() follows symlinks, so a link that points outside is caught too.
        try:
            full = (self.root / candidate).resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before 3.13)
            raise InvalidToolArgumentsError(f"path cannot be resolved: {relative!r}") from exc
        if full != self.root and self.root not in full.parents:
            raise InvalidToolArgumentsError(f"path escapes the workspace: {relative!r}")
        return full

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() or "."

    def write_file(self, path: str, content: str, append: bool = False) -> dict[str, Any]:
        data = content.encode("utf-8")
        if len(data) > MAX_WRITE_BYTES:
            raise InvalidToolArgumentsError(
                f"content of {len(data)} bytes exceeds the {MAX_WRITE_BYTES}-byte limit"
            )
        full = self.resolve(path)
        if full == self.root or full.is_dir():
            raise InvalidToolArgumentsError(f"{path!r} is a directory")
        full.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        # O_NOFOLLOW: a symlink planted after the check is not followed out.
        fd = os.open(full, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        size = full.stat().st_size
        return {"path": self.relative(full), "bytes_written": len(data), "size": size}

    def read_file(self, path: str, max_bytes: int = DEFAULT_READ_BYTES) -> dict[str, Any]:
        if not 1 <= max_bytes <= MAX_READ_BYTES:
            raise InvalidToolArgumentsError(f"max_bytes must be between 1 and {MAX_READ_BYTES}")
        full = self.resolve(path)
        if not full.exists():
            raise ToolExecutionError(f"no such file: {path!r}")
        if not full.is_file():
            raise InvalidToolArgumentsError(f"{path!r} is not a file")
        size = full.stat().st_size
        with full.open("rb") as f:
            data = f.read(max_bytes)
        return {
            "path": self.relative(full),
            "content": data.decode("utf-8", errors="replace"),
            "size": size,
            "truncated": size > len(data),
        }

    def list_files(self, path: str = ".", recursive: bool = False) -> dict[str, Any]:
        full = self.resolve(path)
        if not full.is_dir():
            raise InvalidToolArgumentsError(f"{path!r} is not a directory")
        entries: list[dict[str, Any]] = []
        truncated = False
        walker = sorted(full.rglob("*")) if recursive else sorted(full.iterdir())
        for entry in walker:
            if len(entries) >= MAX_LIST_ENTRIES:
                truncated = True
                break
            if entry.is_symlink():
                kind = "symlink"
            elif entry.is_dir():
                kind = "directory"
            else:
                kind = "file"
            item: dict[str, Any] = {"path": self.relative(entry), "type": kind}
            if kind == "file":
                item["size"] = entry.stat().st_size
            entries.append(item)
        return {"path": self.relative(full), "entries": entries, "truncated": truncated}


def workspace_provider(root: str | Path, *, provider_id: str = "workspace") -> ToolProvider:
    """A :class:`ToolProvider` serving the workspace tools on ``root`` plus ``text.sha256``."""
    default = Workspace(root)
    spaces: dict[str, Workspace] = {"": default}

    def workspace() -> Workspace:
        """The workspace of the tenant whose task calls."""
        tenant = current_call().tenant
        space = spaces.get(tenant)
        if space is None:
            if not _TENANT_NAME.fullmatch(tenant):
                raise ToolExecutionError(f"{tenant[:80]!r} is not a tenant name")
            space = Workspace(default.root.parent / f"{default.root.name}.tenant-{tenant}")
            spaces[tenant] = space
        return space

    provider = ToolProvider(provider_id, labels={"kind": "workspace"})

    @provider.tool(
        "workspace.write_file",
        description="Write a UTF-8 text file in the workspace (creates folders; "
        "append=true appends). Paths are relative to the workspace.",
        side_effects=True,
    )
    def write_file(path: str, content: str, append: bool = False) -> dict[str, Any]:
        ws = workspace()
        return _fs(path, lambda: ws.write_file(path, content, append))

    @provider.tool(
        "workspace.read_file",
        description="Read a text file from the workspace (at most max_bytes bytes).",
    )
    def read_file(path: str, max_bytes: int = DEFAULT_READ_BYTES) -> dict[str, Any]:
        ws = workspace()
        return _fs(path, lambda: ws.read_file(path, max_bytes))

    @provider.tool(
        "workspace.list_files",
        description="List the files in a workspace folder (recursive=true for all below it).",
    )
    def list_files(path: str = ".", recursive: bool = False) -> dict[str, Any]:
        ws = workspace()
        return _fs(path, lambda: ws.list_files(path, recursive))

    @provider.tool("text.sha256", description="SHA-256 of a UTF-8 text, hex encoded.")
    async def sha256(text: str) -> dict[str, str]:
        return {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}

    return provider
