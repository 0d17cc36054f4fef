"""The GUI sandbox as ``computer.*`` tools over the unmodified ``lybic`` SDK.

One code path for the Lybic cloud and the local sandbox server
(:mod:`localsandbox`, reached only over HTTP): only the endpoint differs.

World-changing actions are never retried: the SDK's client is built with
``max_retries=0`` (its default retries *every* non-2xx answer and every
network error, so a click whose answer was lost would be clicked twice), and
nothing here retries an action either. Read-only calls (screenshot, get) are
retried on network errors and 5xx only.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import httpx
from lybic import LybicAPIError, LybicAuth, LybicClient, Sandbox, dto
from lybic.action import (
    AndroidBackAction,
    AndroidHomeAction,
    OsCloseAppAction,
    OsCloseAppByNameAction,
    OsListAppsAction,
    OsStartAppAction,
    OsStartAppByNameAction,
    TouchDragAction,
    TouchLongPressAction,
    TouchSwipeAction,
    TouchTapAction,
)
from lybic.exceptions import LybicInternalError
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from commander import _metrics
from commander._errors import InvalidToolArgumentsError, ToolError, ToolExecutionError
from commander._provider import current_call
from commander.gui import _actions as act
from commander.gui._errors import ParseError
from commander.gui._keys import xdotool_keys
from commander.sandbox._owners import SandboxOwners

_log = logging.getLogger("commander.sandbox")

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://api.lybic.cn"
#: The local sandbox server's shape used when nothing names one (the cloud has no default).
LOCAL_SHAPE = "local-1280x720"
#: Longest text one ``computer.type`` call may carry.
MAX_TYPE_CHARS = 10_000
#: Longest ``computer.wait``.
MAX_WAIT_MS = 60_000
_MAX_COORD = 16_384
_MAX_SCROLL = 200


@dataclasses.dataclass(frozen=True)
class SandboxSettings:
    """Where the sandboxes live and how they are reached.

    ``timeout`` bounds each HTTP request to the sandbox API; typing a long
    text is one request that lasts as long as the typing, so it is generous.
    """

    endpoint: str = DEFAULT_ENDPOINT
    org_id: str = ""
    api_key: str = dataclasses.field(default="", repr=False)
    #: Shape of the sandboxes created when a task names none ("": the local
    #: server's 1280x720 off the cloud; required on the cloud).
    default_shape: str = ""
    #: A sandbox to use when a task names none (seed 000's LYBIC_PRECREATE_SID).
    precreate_sid: str = ""
    timeout: float = 300.0
    #: Attempts of a read-only call (screenshot, get) on network errors and 5xx.
    read_attempts: int = 3

    @property
    def configured(self) -> bool:
        """Whether a sandbox API is set up: an endpoint of our own, or Lybic credentials."""
        return bool(self.org_id and self.api_key) or self.endpoint != DEFAULT_ENDPOINT

    @classmethod
    def from_env(cls, **overrides: Any) -> SandboxSettings:
        """Settings from ``LYBIC_API_ENDPOINT``, ``LYBIC_ORG_ID``, ``LYBIC_API_KEY``,
        ``LYBIC_PRECREATE_SID``, ``LYBIC_SANDBOX_SHAPE``; keyword overrides win."""
        values: dict[str, Any] = {
            "endpoint": os.environ.get("LYBIC_API_ENDPOINT") or DEFAULT_ENDPOINT,
            "org_id": os.environ.get("LYBIC_ORG_ID", ""),
            "api_key": os.environ.get("LYBIC_API_KEY", ""),
            "precreate_sid": os.environ.get("LYBIC_PRECREATE_SID", ""),
            "default_shape": os.environ.get("LYBIC_SANDBOX_SHAPE", ""),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _retryable_read(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError | LybicInternalError):
        return True
    if isinstance(exc, LybicAPIError):
        return (exc.status_code or 0) >= 500
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LybicAPIError):
        return f"sandbox API error {exc.status_code}: {exc.message}"
    if isinstance(exc, LybicInternalError):
        return f"sandbox API unavailable ({exc.status_code})"
    if isinstance(exc, httpx.TimeoutException):
        return "the sandbox API did not answer in time"
    if isinstance(exc, httpx.TransportError):
        return "the sandbox API could not be reached"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"sandbox API error {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}"


def _tool_error(exc: BaseException, *, world_changing: bool) -> ToolError:
    message = _describe(exc)
    if world_changing and isinstance(exc, httpx.TransportError | LybicInternalError):
        # The request may have reached the sandbox: say so rather than guess.
        message += "; the action may or may not have been performed (it was not retried)"
    if isinstance(exc, LybicAPIError) and exc.status_code in (400, 404, 422):
        return InvalidToolArgumentsError(message)
    return ToolExecutionError(message)


def _int_in(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToolArgumentsError(f"{name} must be a number")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidToolArgumentsError(f"{name} must be a whole number")
        value = int(value)
    if not lo <= value <= hi:
        raise InvalidToolArgumentsError(f"{name} must be within {lo}..{hi}, got {value}")
    return int(value)


def _point(x: Any, y: Any) -> act.Point:
    return act.Point(_int_in(x, "x", 0, _MAX_COORD), _int_in(y, "y", 0, _MAX_COORD))


_BUTTONS = {
    "left": act.MouseButton.LEFT,
    "right": act.MouseButton.RIGHT,
    "middle": act.MouseButton.MIDDLE,
}


def _button(name: str) -> act.MouseButton:
    try:
        return _BUTTONS[name]
    except KeyError:
        raise InvalidToolArgumentsError(
            f"button must be one of {', '.join(_BUTTONS)}, got {name!r}"
        ) from None


def _sandbox_id(sandbox_id: Any) -> str:
    if not isinstance(sandbox_id, str) or not sandbox_id or len(sandbox_id) > 200:
        raise InvalidToolArgumentsError("sandbox_id must be a non-empty string")
    return sandbox_id


class SandboxTools:
    """The operations behind the ``computer.*`` tools, on one Lybic org.

    Actions on one sandbox run one at a time (a lock per sandbox): two
    sessions sharing a sandbox cannot interleave the halves of a drag.
    """

    def __init__(self, settings: SandboxSettings, client: LybicClient | None = None) -> None:
        self.settings = settings
        self._client = client
        self._locks: dict[str, anyio.Lock] = {}
        #: Sandboxes this process created (and may destroy).
        self.created: set[str] = set()
        #: Which task may act on which sandbox (checked by the ``computer.*`` provider).
        self.owners = SandboxOwners(settings.precreate_sid)

    def _lybic(self) -> LybicClient:
        if self._client is None:
            if not self.settings.org_id or not self.settings.api_key:
                raise ToolExecutionError(
                    "the sandbox provider has no Lybic credentials "
                    "(LYBIC_ORG_ID and LYBIC_API_KEY, or --sandbox-endpoint for the local sandbox)"
                )
            self._client = LybicClient(
                LybicAuth(
                    org_id=self.settings.org_id,
                    api_key=self.settings.api_key,
                    endpoint=self.settings.endpoint,
                ),
                # The SDK takes an int; it becomes httpx's timeout for every phase.
                timeout=max(1, round(self.settings.timeout)),
                # Never 3 (the default): it re-sends world-changing actions.
                max_retries=0,
            )
        return self._client

    def _sandbox(self) -> Sandbox:
        return Sandbox(self._lybic())

    async def aclose(self) -> None:
        """Close the HTTP client."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _read(self, fn: Callable[[], Awaitable[T]]) -> T:
        """A read-only call, retried on network errors and 5xx."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(max(1, self.settings.read_attempts)),
                wait=wait_random_exponential(multiplier=0.2, max=2.0),
                retry=retry_if_exception(_retryable_read),
                reraise=True,
            ):
                with attempt:
                    return await fn()
        except (LybicAPIError, LybicInternalError, httpx.HTTPError) as exc:
            raise _tool_error(exc, world_changing=False) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # --- sandbox life ---

    async def acquire(
        self,
        sandbox_id: str = "",
        shape: str = "",
        max_life_seconds: int = 3600,
        *,
        on_created: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Use ``sandbox_id`` (or the precreated one, for the default tenant's
        tasks only: with tenants it would be shared by all), or create one of
        ``shape`` (``on_created`` is told its id at once, before anything else
        can fail)."""
        max_life = _int_in(max_life_seconds, "max_life_seconds", 60, 86_400)
        precreated = "" if current_call().tenant else self.settings.precreate_sid
        sid = sandbox_id or precreated
        created = False
        if sid:
            got = await self._read(lambda: self._sandbox().get(sid))
            sid = got.sandbox.id
        else:
            shape = shape or self.settings.default_shape
            if not shape and self.settings.endpoint != DEFAULT_ENDPOINT:
                shape = LOCAL_SHAPE
            if not shape:
                raise InvalidToolArgumentsError(
                    "no sandbox shape: name one in the task's sandbox (shapeName) or set "
                    "LYBIC_SANDBOX_SHAPE on the sandbox provider"
                )
            try:
                made = await self._sandbox().create(
                    name="commander-gui", shape=shape, maxLifeSeconds=max_life
                )
            except (LybicAPIError, LybicInternalError, httpx.HTTPError) as exc:
                raise _tool_error(exc, world_changing=True) from exc
            except ValidationError as exc:
                raise InvalidToolArgumentsError(f"cannot create the sandbox: {exc}") from exc
            sid = made.id
            created = True
            self.created.add(sid)
            if on_created is not None:
                on_created(sid)
            _log.info("created sandbox %s (%s)", sid, shape)
        shot = await self.screenshot(sid)
        return {
            "sandbox_id": sid,
            "created": created,
            "width": shot["width"],
            "height": shot["height"],
        }

    async def release(self, sandbox_id: str) -> dict[str, Any]:
        """Destroy a sandbox (never the precreated one, which outlives tasks)."""
        sid = _sandbox_id(sandbox_id)
        if sid == self.settings.precreate_sid:
            return {"sandbox_id": sid, "deleted": False, "reason": "the precreated sandbox is kept"}
        try:
            await self._sandbox().delete(sid)
        except LybicAPIError as exc:
            if exc.status_code != 404:
                raise _tool_error(exc, world_changing=False) from exc
        except (LybicInternalError, httpx.HTTPError) as exc:
            raise _tool_error(exc, world_changing=False) from exc
        self.created.discard(sid)
        self.owners.released(sid)
        self._locks.pop(sid, None)
        _log.info("deleted sandbox %s", sid)
        return {"sandbox_id": sid, "deleted": True}

    # --- observation ---

    async def screenshot(self, sandbox_id: str) -> dict[str, Any]:
        """The screen as base64 (WebP as the sandbox serves it, else PNG) and its size."""
        sid = _sandbox_id(sandbox_id)
        _url, image, b64 = await self._read(lambda: self._sandbox().get_screenshot(sid))
        mime = "image/webp"
        if not b64:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            b64 = base64.b64encode(buf.getvalue()).decode("ascii")
            mime = "image/png"
        width, height = image.size
        return {"image_base64": b64, "mime_type": mime, "width": width, "height": height}

    async def describe_screen(self, sandbox_id: str) -> dict[str, Any]:
        """What is on an X11 sandbox's screen, as data and as text, for models
        that cannot see: screen size, visible named windows with their geometry,
        the window with keyboard focus and the pointer. Read with ``xdotool``
        through the sandbox's own process API (nothing is clicked or typed)."""
        sid = _sandbox_id(sandbox_id)
        request = dto.SandboxProcessRequestDto(executable="/bin/sh", args=["-c", _DESCRIBE_SH])
        answer = await self._read(lambda: self._sandbox().execute_process(sid, data=request))
        out = base64.b64decode(answer.stdoutBase64 or "").decode("utf-8", "replace")
        if answer.exitCode != 0 and "SCREEN=" not in out:
            err = base64.b64decode(answer.stderrBase64 or "").decode("utf-8", "replace")
            raise ToolExecutionError(
                f"the sandbox could not describe its screen (exit {answer.exitCode}): "
                f"{err.strip()[:300]}"
            )
        return parse_screen_description(out)

    # --- actions: one request each, never retried ---

    async def act(self, sandbox_id: str, action: act.Action | BaseModel) -> dict[str, Any]:
        """Perform one action (a typed action, or any SDK action DTO: touch:*,
        android:*, os:*); the answer carries the pointer position and the action's result."""
        sid = _sandbox_id(sandbox_id)
        model: BaseModel = action if isinstance(action, BaseModel) else act.to_sdk_action(action)
        _check_keys(model)
        kind = str(getattr(model, "type", ""))
        data = dto.ExecuteSandboxActionDto(
            action=model, includeScreenShot=False, includeCursorPosition=True
        )
        lock = self._locks.setdefault(sid, anyio.Lock())
        async with lock:
            started = time.monotonic()
            outcome = "error"
            try:
                answer = await self._sandbox().execute_sandbox_action(sid, data=data)
                outcome = "ok"
            except (LybicAPIError, LybicInternalError, httpx.HTTPError) as exc:
                raise _tool_error(exc, world_changing=True) from exc
            finally:
                metrics = _metrics.current
                if metrics is not None:
                    metrics.observe_action(kind, outcome, time.monotonic() - started)
        result: dict[str, Any] = {"ok": True, "action": kind}
        if answer.cursorPosition is not None:
            cursor = answer.cursorPosition
            result["cursor"] = {"x": cursor.x, "y": cursor.y}
        if answer.actionResult is not None:
            result["result"] = answer.actionResult
        return result


#: Key fields of the SDK's actions: (field, whether it holds a space-separated sequence).
_KEY_FIELDS = (("keys", True), ("key", False), ("holdKey", False))


def _check_keys(model: BaseModel) -> None:
    """Every key name of an action, whoever built it, is one the key table knows."""
    for field, sequence in _KEY_FIELDS:
        value = getattr(model, field, None)
        if value is not None and value != "":
            _key(value, field, sequence=sequence)


#: Lists the screen with xdotool (one process call; window titles are read, never run).
_DESCRIBE_SH = r"""
printf 'SCREEN=%s\n' "$(xdotool getdisplaygeometry 2>/dev/null)"
printf 'FOCUS=%s\n' "$(xdotool getwindowfocus 2>/dev/null)"
xdotool getmouselocation --shell 2>/dev/null | sed -n 's/^\([XY]\)=/POINTER_\1=/p'
for w in $(xdotool search --onlyvisible --name . 2>/dev/null | head -n 40); do
  printf 'WINDOW=%s\n' "$w"
  xdotool getwindowgeometry --shell "$w" 2>/dev/null | grep -E '^(X|Y|WIDTH|HEIGHT)='
  printf 'NAME=%s\n' "$(xdotool getwindowname "$w" 2>/dev/null | tr -d '\r\n' | cut -c1-200)"
done
"""


def _to_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def parse_screen_description(out: str) -> dict[str, Any]:
    """The output of the describe script as ``{width, height, pointer, windows, text}``."""
    width = height = 0
    focus: int | None = None
    pointer: dict[str, int] = {}
    windows: list[dict[str, Any]] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key == "SCREEN":
            w, _, h = value.strip().partition(" ")
            width, height = _to_int(w) or 0, _to_int(h) or 0
        elif key == "FOCUS":
            focus = _to_int(value)
        elif key in ("POINTER_X", "POINTER_Y"):
            n = _to_int(value)
            if n is not None:
                pointer[key[-1].lower()] = n
        elif key == "WINDOW":
            wid = _to_int(value)
            if wid is not None:
                windows.append({"id": wid, "title": "", "x": 0, "y": 0, "width": 0, "height": 0})
        elif windows and key in ("X", "Y", "WIDTH", "HEIGHT"):
            windows[-1][key.lower()] = _to_int(value) or 0
        elif windows and key == "NAME":
            windows[-1]["title"] = value
    # Only windows one could act on: some size, on the screen, each id once.
    seen: set[int] = set()
    kept: list[dict[str, Any]] = []
    for win in windows:
        if win["id"] in seen or win["width"] < 2 or win["height"] < 2:
            continue
        seen.add(win["id"])
        win["focused"] = win["id"] == focus
        kept.append(win)
    lines = [f"Screen: {width}x{height} pixels."]
    if kept:
        lines.append("Visible windows:")
        for win in kept:
            lines.append(
                f'- "{win["title"]}" at x={win["x"]} y={win["y"]}, '
                f"{win['width']}x{win['height']} pixels"
                + (", has the keyboard focus" if win["focused"] else "")
            )
    else:
        lines.append("No windows are visible.")
    if not any(w["focused"] for w in kept):
        lines.append("No listed window has the keyboard focus (typing goes where the pointer is).")
    if pointer.keys() == {"x", "y"}:
        lines.append(f"Pointer at x={pointer['x']} y={pointer['y']}.")
    return {
        "width": width,
        "height": height,
        "pointer": pointer or None,
        "windows": kept,
        "text": "\n".join(lines),
    }


# --- tool argument → action builders (shared by the provider and tests) ---


def click_action(kind: str, x: Any, y: Any, button: str = "left", hold_key: str = "") -> act.Action:
    at = _point(x, y)
    btn = _button(button)
    hold = _key(hold_key, "hold_key") if hold_key else None
    if kind == "double":
        return act.MouseDoubleClick(at, btn, hold)
    if kind == "triple":
        return act.MouseTripleClick(at, btn, hold)
    return act.MouseClick(at, btn, hold)


def drag_action(start_x: Any, start_y: Any, end_x: Any, end_y: Any) -> act.Action:
    return act.MouseDrag(_point(start_x, start_y), _point(end_x, end_y))


def scroll_action(x: Any, y: Any, down: Any = 0, right: Any = 0) -> act.Action:
    return act.MouseScroll(
        _point(x, y),
        _int_in(down, "down", -_MAX_SCROLL, _MAX_SCROLL),
        _int_in(right, "right", -_MAX_SCROLL, _MAX_SCROLL),
    )


def type_action(text: Any, submit_newlines: bool = True) -> act.Action:
    if not isinstance(text, str):
        raise InvalidToolArgumentsError("text must be a string")
    if len(text) > MAX_TYPE_CHARS:
        raise InvalidToolArgumentsError(f"text is longer than {MAX_TYPE_CHARS} characters")
    return act.KeyboardType(text, bool(submit_newlines))


def _key(value: Any, name: str, *, sequence: bool = False) -> str:
    """A key argument checked against the GUI parser's key table (the one list of
    key names a tool may press; an xdotool command such as ``exec`` is none)."""
    if not isinstance(value, str) or not value or len(value) > 100:
        raise InvalidToolArgumentsError(f"{name} must be a key name in xdotool syntax, e.g. ctrl+c")
    try:
        return xdotool_keys(value, sequence=sequence)
    except ParseError as exc:
        raise InvalidToolArgumentsError(f"{name}: {exc}") from None


def hotkey_action(keys: Any, duration_ms: Any = None) -> act.Action:
    duration = None if duration_ms is None else _int_in(duration_ms, "duration_ms", 1, 10_000)
    return act.KeyboardHotkey(_key(keys, "keys", sequence=True), duration)


def key_down_action(key: Any) -> act.Action:
    return act.KeyDown(_key(key, "key"))


def key_up_action(key: Any) -> act.Action:
    return act.KeyUp(_key(key, "key"))


def move_action(x: Any, y: Any) -> act.Action:
    return act.MouseMove(_point(x, y))


# --- Android sandboxes: touch:*, android:*, os:* ---

#: Actions without arguments, by tool suffix.
SIMPLE_MOBILE_ACTIONS: dict[str, type[BaseModel]] = {
    "back": AndroidBackAction,
    "home": AndroidHomeAction,
    "list_apps": OsListAppsAction,
}


def _px(v: int) -> Any:
    return dto.PixelLength(type="px", value=v)


def _model(action: Any) -> BaseModel:
    assert isinstance(action, BaseModel)
    return action


def tap_action(x: Any, y: Any) -> BaseModel:
    p = _point(x, y)
    return _model(TouchTapAction(x=_px(p.x), y=_px(p.y)))


def long_press_action(x: Any, y: Any, duration_ms: Any = 1000) -> BaseModel:
    p = _point(x, y)
    return _model(
        TouchLongPressAction(
            x=_px(p.x), y=_px(p.y), duration=_int_in(duration_ms, "duration_ms", 1, 10_000)
        )
    )


def swipe_action(x: Any, y: Any, direction: Any, distance: Any) -> BaseModel:
    if direction not in ("up", "down", "left", "right"):
        raise InvalidToolArgumentsError("direction must be up, down, left or right")
    p = _point(x, y)
    return _model(
        TouchSwipeAction(
            x=_px(p.x),
            y=_px(p.y),
            direction=direction,
            distance=_px(_int_in(distance, "distance", 1, _MAX_COORD)),
        )
    )


def touch_drag_action(start_x: Any, start_y: Any, end_x: Any, end_y: Any) -> BaseModel:
    a, b = _point(start_x, start_y), _point(end_x, end_y)
    return _model(TouchDragAction(startX=_px(a.x), startY=_px(a.y), endX=_px(b.x), endY=_px(b.y)))


def _app(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 300:
        raise InvalidToolArgumentsError(f"{name} must be a non-empty string")
    return value


def start_app_action(package_name: Any = "", name: Any = "") -> BaseModel:
    if package_name:
        return _model(OsStartAppAction(packageName=_app(package_name, "package_name")))
    return _model(OsStartAppByNameAction(name=_app(name, "name (or package_name)")))


def close_app_action(package_name: Any = "", name: Any = "") -> BaseModel:
    if package_name:
        return _model(OsCloseAppAction(packageName=_app(package_name, "package_name")))
    return _model(OsCloseAppByNameAction(name=_app(name, "name (or package_name)")))
