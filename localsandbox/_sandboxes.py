"""Sandboxes: each one an Xvfb display, a private directory and its processes.

:class:`SandboxManager` owns them all. It is an async context manager: on
exit it deletes every sandbox it still has (display stopped, processes
killed, directory removed). A background task deletes sandboxes whose
``maxLifeSeconds`` ran out, as the cloud does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import httpx
from PIL import ImageGrab

from localsandbox import _files, _process, _xinput
from localsandbox._display import Display, start_display, write_xauthority
from localsandbox._errors import (
    ActionFailedError,
    BadRequestError,
    CapacityError,
    NotFoundError,
)

log = logging.getLogger(__name__)

#: Environment variable that marks every process of a sandbox, so that deleting
#: the sandbox finds and kills even daemonised descendants.
TAG_VAR = "LOCALSANDBOX_TAG"

_SHAPE = re.compile(r"local-(\d{3,4})x(\d{3,4})")
_MIN_W, _MIN_H, _MAX_W, _MAX_H = 320, 240, 3840, 2160
#: The shapes /shapes lists; any ``local-<W>x<H>`` within the bounds above works too.
PRESET_SHAPES = ("local-1280x720", "local-1920x1080", "local-1366x768", "local-1024x768")
DEFAULT_PROJECT = "PRJ-local"
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Shape:
    """A desktop shape: the screen size of the sandbox's display."""

    name: str
    width: int
    height: int

    @classmethod
    def parse(cls, name: str) -> Shape:
        m = _SHAPE.fullmatch(name)
        if m:
            w, h = int(m.group(1)), int(m.group(2))
            if _MIN_W <= w <= _MAX_W and _MIN_H <= h <= _MAX_H:
                return cls(name, w, h)
        raise BadRequestError(
            f"unknown shape {name[:60]!r}; use local-<width>x<height> within "
            f"{_MIN_W}x{_MIN_H}..{_MAX_W}x{_MAX_H}, e.g. " + ", ".join(PRESET_SHAPES)
        )

    def description(self) -> str:
        return f"Local Xvfb desktop, {self.width}x{self.height}"

    def dto_fields(self) -> dict[str, Any]:
        """The fields of the SDK's ``Shape``."""
        return {
            "name": self.name,
            "description": self.description(),
            "hardwareAcceleratedEncoding": False,
            "pricePerHour": 0.0,
            "requiredPlanTier": 0,
            "requiredFeatureFlag": None,
            "os": "Linux",
            "virtualization": "Container",
            "architecture": _ARCH.get(platform.machine().lower(), "x86_64"),
        }


@dataclass(frozen=True)
class Limits:
    """Bounds on what clients can make the server do."""

    max_sandboxes: int = 8
    process_timeout: float = 60.0
    max_process_output: int = 8 * 1024 * 1024
    max_copy_bytes: int = 64 * 1024 * 1024
    max_copy_items: int = 100
    #: Pause after input before the screenshot, so the application can redraw.
    settle_ms: int = 100
    screenshot_ttl: float = 300.0
    max_screenshots: int = 64


@dataclass
class Sandbox:
    id: str
    org_id: str
    name: str
    project_id: str
    shape: Shape
    created_at: datetime
    expires_at: datetime
    dir: Path
    display: Display
    env: dict[str, str]
    tag: str
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def home(self) -> Path:
        return self.root / _files.HOME.lstrip("/")

    def status(self) -> str:
        return "RUNNING" if self.display.running() else "ERROR"

    def dto_fields(self, *, with_shape: bool) -> dict[str, Any]:
        """The fields of the SDK's ``Sandbox``."""
        fields: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "expiresAt": _iso(self.expires_at),
            "expiredAt": _iso(self.expires_at),  # deprecated spelling the API still sends
            "createdAt": _iso(self.created_at),
            "projectId": self.project_id,
            "shapeName": self.shape.name,
            "status": self.status(),
        }
        if with_shape:
            fields["shape"] = self.shape.dto_fields()
        return fields


@dataclass(frozen=True)
class Cursor:
    x: int
    y: int
    screen_width: int
    screen_height: int
    screen_index: int


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now() -> datetime:
    return datetime.now(UTC)


def _grab_webp(display: str) -> bytes:
    # Runs in a worker thread. Lossless WebP at the fastest method: exact pixels
    # (small text stays legible for the model) at a few ms per frame.
    image = ImageGrab.grab(xdisplay=display)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="WEBP", lossless=True, method=0)
    return buf.getvalue()


def kill_tagged(tag: str, grace: float = 1.0) -> int:
    """SIGTERM, then SIGKILL, every process whose environment carries ``tag``. Blocking."""
    needle = f"{TAG_VAR}={tag}".encode()
    me = os.getpid()

    def tagged() -> list[int]:
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    victims = tagged()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while victims and time.monotonic() < deadline:
            time.sleep(0.05)
            victims = [p for p in victims if _alive(p)]
        if not victims:
            break
    return len(victims)


def _make_dirs(*paths: Path) -> None:
    for p in paths:
        p.mkdir(parents=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return False


class SandboxManager:
    """Creates, finds and deletes sandboxes under ``state_dir``.

    The server process must have ``XAUTHORITY`` pointing at :attr:`xauthority`
    (see :func:`localsandbox.serve`): the in-process screenshot reads
    the cookie from the environment.
    """

    def __init__(self, state_dir: Path, limits: Limits | None = None) -> None:
        self.state_dir = state_dir
        self.limits = limits or Limits()
        self.xauthority = state_dir / "Xauthority"
        self._sandboxes: dict[str, Sandbox] = {}
        self._creating = 0
        self._shots: OrderedDict[str, tuple[bytes, float, str]] = OrderedDict()
        self._stack = contextlib.AsyncExitStack()
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> SandboxManager:
        await anyio.to_thread.run_sync(self._prepare_state_dir)
        self._http = await self._stack.enter_async_context(
            httpx.AsyncClient(timeout=30.0, follow_redirects=False)
        )
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        tg.start_soon(self._reap_expired)
        self._stack.callback(tg.cancel_scope.cancel)
        return self

    def _prepare_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_xauthority(self.xauthority)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            for sb in list(self._sandboxes.values()):
                self._sandboxes.pop(sb.id, None)
                await self._destroy(sb)
        await self._stack.__aexit__(exc_type, exc, tb)

    # ------------------------------------------------------------------ lifecycle

    async def create(
        self, org_id: str, *, name: str, shape: str, max_life_seconds: int, project_id: str | None
    ) -> Sandbox:
        parsed = Shape.parse(shape)
        if len(self._sandboxes) + self._creating >= self.limits.max_sandboxes:
            raise CapacityError(
                f"this server runs at most {self.limits.max_sandboxes} sandboxes; delete one first"
            )
        self._creating += 1
        try:
            sid = "SBX-" + secrets.token_hex(10).upper()
            tag = secrets.token_hex(16)
            sb_dir = self.state_dir / "sandboxes" / sid
            home = sb_dir / "root" / _files.HOME.lstrip("/")
            await anyio.to_thread.run_sync(_make_dirs, home, sb_dir / "root" / "tmp")
            base_env = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "HOME": str(home),
                "TMPDIR": str(sb_dir / "root" / "tmp"),
                "XAUTHORITY": str(self.xauthority),
                "TERM": "xterm",
                TAG_VAR: tag,
            }
            try:
                display = await start_display(
                    parsed.width,
                    parsed.height,
                    xauthority=self.xauthority,
                    log_path=sb_dir / "xvfb.log",
                    env=base_env,
                )
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(shutil.rmtree, sb_dir, True)
                raise
            now = _now()
            sb = Sandbox(
                id=sid,
                org_id=org_id,
                name=name,
                project_id=project_id or DEFAULT_PROJECT,
                shape=parsed,
                created_at=now,
                expires_at=now + timedelta(seconds=max_life_seconds),
                dir=sb_dir,
                display=display,
                env={**base_env, "DISPLAY": display.name},
                tag=tag,
            )
            self._sandboxes[sid] = sb
            log.info("sandbox %s created (%s, display %s)", sid, parsed.name, display.name)
            return sb
        finally:
            self._creating -= 1

    def get(self, org_id: str, sandbox_id: str) -> Sandbox:
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or sb.org_id != org_id:
            raise NotFoundError(f"sandbox {sandbox_id[:40]!r} not found")
        return sb

    def sandboxes(self, org_id: str) -> list[Sandbox]:
        return [sb for sb in self._sandboxes.values() if sb.org_id == org_id]

    async def delete(self, org_id: str, sandbox_id: str) -> None:
        sb = self.get(org_id, sandbox_id)
        self._sandboxes.pop(sb.id, None)
        await self._destroy(sb)

    def extend(self, org_id: str, sandbox_id: str, seconds: int) -> Sandbox:
        sb = self.get(org_id, sandbox_id)
        sb.expires_at = _now() + timedelta(seconds=seconds)
        return sb

    async def _destroy(self, sb: Sandbox) -> None:
        with anyio.CancelScope(shield=True):
            await sb.display.stop()
            left = await anyio.to_thread.run_sync(kill_tagged, sb.tag)
            if left:
                log.warning("sandbox %s: %d processes survived SIGKILL", sb.id, left)
            await anyio.to_thread.run_sync(shutil.rmtree, sb.dir, True)
            for token in [t for t, (_, _, s) in self._shots.items() if s == sb.id]:
                del self._shots[token]
        log.info("sandbox %s deleted", sb.id)

    async def _reap_expired(self) -> None:
        while True:
            await anyio.sleep(1.0)
            now = _now()
            for sb in [s for s in self._sandboxes.values() if s.expires_at <= now]:
                log.info("sandbox %s expired", sb.id)
                self._sandboxes.pop(sb.id, None)
                await self._destroy(sb)

    # ------------------------------------------------------------------ screen and input

    async def screenshot(self, sb: Sandbox) -> str:
        """Takes a screenshot; returns the token under which :meth:`screenshot_bytes` has it."""
        try:
            data = await anyio.to_thread.run_sync(_grab_webp, sb.display.name)
        except OSError as exc:
            raise ActionFailedError(f"screenshot failed: {exc}") from exc
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        self._shots[token] = (data, now + self.limits.screenshot_ttl, sb.id)
        while len(self._shots) > self.limits.max_screenshots:
            self._shots.popitem(last=False)
        for t in [t for t, (_, exp, _) in self._shots.items() if exp <= now]:
            del self._shots[t]
        return token

    def screenshot_bytes(self, token: str) -> bytes | None:
        entry = self._shots.get(token)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    async def upload_screenshot(self, token: str, url: str) -> None:
        data = self.screenshot_bytes(token)
        assert data is not None and self._http is not None
        try:
            resp = await self._http.put(url, content=data, headers={"Content-Type": "image/webp"})
        except httpx.HTTPError as exc:
            raise ActionFailedError(f"screenshot upload failed: {type(exc).__name__}") from exc
        if resp.status_code >= 400:
            raise ActionFailedError(f"screenshot upload answered HTTP {resp.status_code}")

    async def cursor(self, sb: Sandbox) -> Cursor:
        x, y, screen = await _xinput.pointer(sb.env)
        return Cursor(x, y, sb.shape.width, sb.shape.height, screen)

    async def perform(self, sb: Sandbox, action: Any) -> None:
        """Performs one SDK action DTO on the sandbox's display (serialised per sandbox)."""
        plan = _xinput.plan(action, sb.shape.width, sb.shape.height)
        async with sb.lock:
            await _xinput.perform(plan, sb.env)
            if plan.steps and self.limits.settle_ms:
                await anyio.sleep(self.limits.settle_ms / 1000)

    # ------------------------------------------------------------------ processes and files

    async def run_process(
        self,
        sb: Sandbox,
        *,
        executable: str,
        args: list[str],
        working_directory: str | None,
        stdin_base64: str | None,
    ) -> _process.ProcessResult:
        if any("\x00" in a for a in args):
            raise BadRequestError("args: NUL character")

        def locate() -> tuple[str, Path]:
            # Filesystem look-ups, off the event loop.
            exe = _process.resolve_executable(executable, sb.env["PATH"])
            cwd = _files.resolve(sb.root, working_directory) if working_directory else sb.home
            if not cwd.is_dir():
                raise BadRequestError(f"workingDirectory: {working_directory!r} is not a directory")
            return exe, cwd

        exe, cwd = await anyio.to_thread.run_sync(locate)
        stdin: bytes | None = None
        if stdin_base64:
            try:
                stdin = base64.b64decode(stdin_base64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadRequestError("stdinBase64: not valid base64") from exc
        return await _process.run(
            [exe, *args],
            cwd=str(cwd),
            env=sb.env,
            stdin=stdin,
            kill_after=self.limits.process_timeout,
            max_output=self.limits.max_process_output,
        )

    async def copy_files(self, sb: Sandbox, items: list[Any]) -> list[Any]:
        if len(items) > self.limits.max_copy_items:
            raise BadRequestError(f"files: at most {self.limits.max_copy_items} items")
        assert self._http is not None
        return [
            await _files.copy_item(item, sb.root, self._http, self.limits.max_copy_bytes)
            for item in items
        ]
