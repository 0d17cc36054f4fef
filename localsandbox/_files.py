"""``copy_files``: between a sandbox's private directory and HTTP locations.

A sandbox sees its own directory tree as ``/``: ``/home/agent/a.txt`` is
``<sandbox root>/home/agent/a.txt`` on the host. Paths are normalised and,
after resolving symbolic links, must stay inside the root, so ``..`` or a
link cannot reach the rest of the host through this API. (Processes started
with ``execute_process`` run as the server's user and are not confined; this
is a local development sandbox, not an isolation boundary.)
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

import anyio
import httpx
from lybic import dto

from localsandbox._errors import BadRequestError

HOME = "/home/agent"


class CopyError(Exception):
    """One item failed; its message goes into that item's result."""


def resolve(root: Path, sandbox_path: str) -> Path:
    """The host path of ``sandbox_path`` inside ``root``; :class:`BadRequestError` if it escapes."""
    if not sandbox_path or "\x00" in sandbox_path:
        raise BadRequestError("path: empty or contains NUL")
    if len(sandbox_path) > 4096:
        raise BadRequestError("path: too long")
    absolute = posixpath.join(HOME, sandbox_path)  # relative paths are relative to HOME
    normal = posixpath.normpath(absolute).lstrip("/")
    real_root = root.resolve()
    candidate = (real_root / normal).resolve()
    if candidate != real_root and not candidate.is_relative_to(real_root):
        raise BadRequestError(f"path: {sandbox_path[:200]!r} is outside the sandbox")
    return candidate


def _read_file(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise CopyError(f"{path.name!r} is not a regular file")
        if size > limit:
            raise CopyError(f"file is {size} bytes; at most {limit} can be copied")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CopyError("no such file") from exc
    except OSError as exc:
        raise CopyError(f"cannot read: {exc.strerror}") from exc


def _write_file(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise CopyError(f"cannot write: {exc.strerror}") from exc


async def _http_get(http: httpx.AsyncClient, loc: Any, limit: int) -> bytes:
    try:
        async with http.stream("GET", loc.url, headers=loc.headers or {}) as resp:
            if resp.status_code >= 400:
                raise CopyError(f"GET answered HTTP {resp.status_code}")
            data = bytearray()
            async for chunk in resp.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise CopyError(f"download is larger than {limit} bytes")
            return bytes(data)
    except httpx.HTTPError as exc:
        raise CopyError(f"GET failed: {type(exc).__name__}") from exc


async def _http_send(http: httpx.AsyncClient, loc: Any, data: bytes, name: str) -> None:
    try:
        if isinstance(loc, dto.HttpPutLocation):
            resp = await http.put(loc.url, content=data, headers=loc.headers or {})
        else:
            form = {str(k): str(v) for k, v in (loc.form or {}).items()}
            files = {loc.fileField or "file": (name, data)}
            resp = await http.post(loc.url, data=form, files=files, headers=loc.headers or {})
    except httpx.HTTPError as exc:
        raise CopyError(f"upload failed: {type(exc).__name__}") from exc
    if resp.status_code >= 400:
        raise CopyError(f"upload answered HTTP {resp.status_code}")


async def copy_item(item: Any, root: Path, http: httpx.AsyncClient, limit: int) -> Any:
    """Performs one ``FileCopyItem``; returns its ``FileCopyResult`` (errors included)."""
    try:
        src, dest = item.src, item.dest
        if isinstance(src, dto.SandboxFileLocation):
            src_path = await anyio.to_thread.run_sync(resolve, root, src.path)
            data = await anyio.to_thread.run_sync(_read_file, src_path, limit)
            name = src_path.name
        elif isinstance(src, dto.HttpGetLocation):
            data = await _http_get(http, src, limit)
            name = posixpath.basename(httpx.URL(src.url).path) or "file"
        else:
            raise CopyError(f"cannot read from a {src.type}")
        if isinstance(dest, dto.SandboxFileLocation):
            dest_path = await anyio.to_thread.run_sync(resolve, root, dest.path)
            await anyio.to_thread.run_sync(_write_file, dest_path, data)
        elif isinstance(dest, dto.HttpPutLocation | dto.HttpPostFormLocation):
            await _http_send(http, dest, data, name)
        else:
            raise CopyError(f"cannot write to a {dest.type}")
    except (CopyError, BadRequestError) as exc:
        return dto.FileCopyResult(id=item.id, success=False, error=str(exc))
    return dto.FileCopyResult(id=item.id, success=True)
