"""The ``computer.*`` tool provider: :class:`SandboxTools` served through the dispatcher.

Every call names a sandbox; the provider lets it act only on one its task owns
(:mod:`commander.sandbox._owners`), and the key names it presses are checked
against the GUI parser's key table (:func:`commander.gui._keys.xdotool_keys`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from commander._errors import InvalidToolArgumentsError
from commander._provider import ToolProvider, current_call
from commander.sandbox._tools import (
    MAX_WAIT_MS,
    SIMPLE_MOBILE_ACTIONS,
    SandboxTools,
    _sandbox_id,
    click_action,
    close_app_action,
    drag_action,
    hotkey_action,
    key_down_action,
    key_up_action,
    long_press_action,
    move_action,
    scroll_action,
    start_app_action,
    swipe_action,
    tap_action,
    touch_drag_action,
    type_action,
)

F = TypeVar("F", bound=Callable[..., Any])

#: Every tool this provider serves, in the order they are declared.
TOOL_NAMES = (
    "computer.sandbox_acquire",
    "computer.sandbox_release",
    "computer.screenshot",
    "computer.describe_screen",
    "computer.click",
    "computer.double_click",
    "computer.triple_click",
    "computer.right_click",
    "computer.middle_click",
    "computer.move",
    "computer.drag",
    "computer.scroll",
    "computer.type",
    "computer.hotkey",
    "computer.key_down",
    "computer.key_up",
    "computer.wait",
    "mobile.tap",
    "mobile.long_press",
    "mobile.swipe",
    "mobile.drag",
    "mobile.back",
    "mobile.home",
    "mobile.list_apps",
    "mobile.start_app",
    "mobile.close_app",
)

# Typing 10,000 characters takes minutes; the dispatcher's default is 30 s.
_TYPE_TIMEOUT_MS = 600_000
_ACTION_TIMEOUT_MS = 60_000
_CREATE_TIMEOUT_MS = 180_000


def _action(
    provider: ToolProvider, name: str, description: str, *, timeout_ms: int = _ACTION_TIMEOUT_MS
) -> Callable[[F], F]:
    """Decorator: serve the function as an action tool, marked ``side_effects`` (the
    dispatcher never retries it blindly), with an action's timeout."""
    return provider.tool(name, description=description, side_effects=True, timeout_ms=timeout_ms)


def _mine(tools: SandboxTools, sandbox_id: Any) -> str:
    """The call's sandbox id, if its task may act on it (``ToolDeniedError`` if not)."""
    return tools.owners.check(current_call(), _sandbox_id(sandbox_id))


def sandbox_provider(tools: SandboxTools, *, provider_id: str = "sandbox") -> ToolProvider:
    """A :class:`ToolProvider` serving the ``computer.*`` tools backed by ``tools``.

    Coordinates are pixels of the sandbox's real screen (``computer.screenshot``
    says its size). Actions are marked ``side_effects``: never retried blindly.
    A call may act only on a sandbox its task owns (``TOOL_ERROR_CODE_DENIED``
    otherwise): see :mod:`commander.sandbox._owners`.
    """
    provider = ToolProvider(provider_id, labels={"kind": "sandbox"})

    @_action(
        provider,
        "computer.sandbox_acquire",
        "Use an existing sandbox (sandbox_id, or the provider's precreated one) or "
        "create one of the given shape; returns its id and screen size.",
        timeout_ms=_CREATE_TIMEOUT_MS,
    )
    async def sandbox_acquire(
        sandbox_id: str = "", shape: str = "", max_life_seconds: int = 3600
    ) -> dict[str, Any]:
        call = current_call()
        if sandbox_id:
            _mine(tools, sandbox_id)
        return await tools.acquire(
            sandbox_id,
            shape,
            max_life_seconds,
            on_created=lambda sid: tools.owners.created(call, sid),
        )

    @_action(
        provider, "computer.sandbox_release", "Destroy a sandbox (the precreated one is kept)."
    )
    async def sandbox_release(sandbox_id: str) -> dict[str, Any]:
        return await tools.release(_mine(tools, sandbox_id))

    @provider.tool(
        "computer.screenshot",
        description="The sandbox's screen as a base64 image, with its width and height in pixels.",
        timeout_ms=_ACTION_TIMEOUT_MS,
    )
    async def screenshot(sandbox_id: str) -> dict[str, Any]:
        return await tools.screenshot(_mine(tools, sandbox_id))

    @provider.tool(
        "computer.describe_screen",
        description="The screen as text, for models that cannot see: its size, the visible "
        "windows (title, position, size), the window with the keyboard focus, the pointer "
        "(X11 sandboxes; read with xdotool, nothing is changed).",
        timeout_ms=_ACTION_TIMEOUT_MS,
    )
    async def describe_screen(sandbox_id: str) -> dict[str, Any]:
        return await tools.describe_screen(_mine(tools, sandbox_id))

    def clicker(kind: str, fixed_button: str | None) -> None:
        name = {
            ("single", None): "computer.click",
            ("double", None): "computer.double_click",
            ("triple", None): "computer.triple_click",
            ("single", "right"): "computer.right_click",
            ("single", "middle"): "computer.middle_click",
        }[(kind, fixed_button)]
        if fixed_button is None:

            async def click(
                sandbox_id: str, x: int, y: int, button: str = "left", hold_key: str = ""
            ) -> dict[str, Any]:
                return await tools.act(
                    _mine(tools, sandbox_id), click_action(kind, x, y, button, hold_key)
                )

            _action(
                provider,
                name,
                f"A {kind} click at pixel (x, y); button left, right or middle; "
                "hold_key: a key held during the click (e.g. ctrl).",
            )(click)
        else:
            button = fixed_button

            async def fixed_click(
                sandbox_id: str, x: int, y: int, hold_key: str = ""
            ) -> dict[str, Any]:
                return await tools.act(
                    _mine(tools, sandbox_id), click_action(kind, x, y, button, hold_key)
                )

            _action(provider, name, f"A {button} click at pixel (x, y).")(fixed_click)

    clicker("single", None)
    clicker("double", None)
    clicker("triple", None)
    clicker("single", "right")
    clicker("single", "middle")

    @_action(provider, "computer.move", "Move the pointer to pixel (x, y).")
    async def move(sandbox_id: str, x: int, y: int) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), move_action(x, y))

    @_action(
        provider,
        "computer.drag",
        "Press the left button at (start_x, start_y), move to (end_x, end_y), release.",
    )
    async def drag(
        sandbox_id: str, start_x: int, start_y: int, end_x: int, end_y: int
    ) -> dict[str, Any]:
        return await tools.act(
            _mine(tools, sandbox_id), drag_action(start_x, start_y, end_x, end_y)
        )

    @_action(
        provider,
        "computer.scroll",
        "Turn the wheel at (x, y): down > 0 scrolls down (< 0 up), right > 0 "
        "scrolls right (< 0 left), in wheel clicks.",
    )
    async def scroll(
        sandbox_id: str, x: int, y: int, down: int = 0, right: int = 0
    ) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), scroll_action(x, y, down, right))

    @_action(
        provider,
        "computer.type",
        "Type text; with submit_newlines each newline presses Enter.",
        timeout_ms=_TYPE_TIMEOUT_MS,
    )
    async def type_text(sandbox_id: str, text: str, submit_newlines: bool = True) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), type_action(text, submit_newlines))

    @_action(
        provider,
        "computer.hotkey",
        "Press a key combination in xdotool syntax, e.g. ctrl+c, Return, alt+F4, "
        "or several separated by spaces (ctrl+a BackSpace); key names as on a keyboard "
        "(enter, esc, tab, backspace, ctrl, alt, shift, up, pagedown, f5) or one character.",
    )
    async def hotkey(sandbox_id: str, keys: str, duration_ms: int | None = None) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), hotkey_action(keys, duration_ms))

    @_action(provider, "computer.key_down", "Hold one key down (xdotool name, e.g. shift).")
    async def key_down(sandbox_id: str, key: str) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), key_down_action(key))

    @_action(provider, "computer.key_up", "Release one key (xdotool name).")
    async def key_up(sandbox_id: str, key: str) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), key_up_action(key))

    @provider.tool(
        "computer.wait",
        description=f"Wait duration_ms milliseconds (at most {MAX_WAIT_MS}).",
        timeout_ms=MAX_WAIT_MS + 10_000,
    )
    async def wait(duration_ms: int, sandbox_id: str = "") -> dict[str, Any]:
        if isinstance(duration_ms, bool) or not isinstance(duration_ms, int):
            raise InvalidToolArgumentsError("duration_ms must be an integer")
        if not 0 <= duration_ms <= MAX_WAIT_MS:
            raise InvalidToolArgumentsError(f"duration_ms must be within 0..{MAX_WAIT_MS}")
        await anyio.sleep(duration_ms / 1000)
        return {"ok": True, "waited_ms": duration_ms}

    _add_mobile_tools(provider, tools)
    return provider


def _add_mobile_tools(provider: ToolProvider, tools: SandboxTools) -> None:
    """Android sandboxes: the SDK's touch:*, android:* and os:* actions."""

    def add(name: str, description: str) -> Callable[[F], F]:
        return _action(provider, name, description + " (Android sandboxes)")

    @add("mobile.tap", "Tap the screen at pixel (x, y).")
    async def tap(sandbox_id: str, x: int, y: int) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), tap_action(x, y))

    @add("mobile.long_press", "Press and hold at (x, y) for duration_ms.")
    async def long_press(
        sandbox_id: str, x: int, y: int, duration_ms: int = 1000
    ) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), long_press_action(x, y, duration_ms))

    @add("mobile.swipe", "Swipe from (x, y) up, down, left or right by distance pixels.")
    async def swipe(
        sandbox_id: str, x: int, y: int, direction: str, distance: int
    ) -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), swipe_action(x, y, direction, distance))

    @add("mobile.drag", "Touch at (start_x, start_y), move to (end_x, end_y), release.")
    async def touch_drag(
        sandbox_id: str, start_x: int, start_y: int, end_x: int, end_y: int
    ) -> dict[str, Any]:
        return await tools.act(
            _mine(tools, sandbox_id), touch_drag_action(start_x, start_y, end_x, end_y)
        )

    for suffix, cls in SIMPLE_MOBILE_ACTIONS.items():

        def simple(model: type[Any] = cls) -> Any:
            async def run(sandbox_id: str) -> dict[str, Any]:
                return await tools.act(_mine(tools, sandbox_id), model())

            return run

        add(f"mobile.{suffix}", f"The {getattr(cls(), 'type', suffix)} action.")(simple())

    @add("mobile.start_app", "Start an app by package_name, or by its name.")
    async def start_app(sandbox_id: str, package_name: str = "", name: str = "") -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), start_app_action(package_name, name))

    @add("mobile.close_app", "Close an app by package_name, or by its name.")
    async def close_app(sandbox_id: str, package_name: str = "", name: str = "") -> dict[str, Any]:
        return await tools.act(_mine(tools, sandbox_id), close_app_action(package_name, name))
