"""Key names a client sends → xdotool arguments that can only press keys.

xdotool chains commands on one command line: ``xdotool key a exec touch x``
presses ``a`` and then *runs* ``touch x`` — its ``key``, ``keydown`` and
``keyup`` stop reading keys at the first argument that names one of its
commands (compared without case, ``--`` does not change that). So a key name
is accepted only when it is

* an X keysym (``Return``, ``a``, ``F5``, ``KP_Add``, ``XF86AudioMute`` — what
  libX11's ``XStringToKeysym`` knows, the table xdotool itself looks names up
  in), one of xdotool's modifier aliases (``ctrl``, ``alt``, ``shift``,
  ``super``, ``meta``, ``control``) or a key code (digits); and
* one argument of its own, which is never an xdotool command name: the one
  keysym spelled like a command (``Help``, the ``help`` command) is passed as
  its number (``0xff6a``), which xdotool presses the same way.

``exec``, ``sleep``, ``type``, ``key`` and every other command name are not
keysyms, so they are refused before any xdotool argument list is built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Callable

from localsandbox._errors import ActionFailedError, BadRequestError

_PART = re.compile(r"[A-Za-z0-9_]{1,40}")
_KEYCODE = re.compile(r"[0-9]{1,3}")

#: xdotool's modifier aliases (xdo_util.h ``symbol_map``), matched without case.
ALIASES = frozenset({"alt", "ctrl", "control", "meta", "super", "shift"})

#: Every command name of xdotool (3.20160805 and later), lower case. An argument
#: equal to one of them (without case) ends a key list and starts that command.
XDOTOOL_COMMANDS = frozenset(
    {
        "behave",
        "behave_screen_edge",
        "click",
        "exec",
        "get_desktop",
        "get_desktop_for_window",
        "get_desktop_viewport",
        "get_num_desktops",
        "getactivewindow",
        "getdisplaygeometry",
        "getmouselocation",
        "getwindowclassname",
        "getwindowfocus",
        "getwindowgeometry",
        "getwindowname",
        "getwindowpid",
        "help",
        "key",
        "keydown",
        "keyup",
        "mousedown",
        "mousemove",
        "mousemove_relative",
        "mouseup",
        "search",
        "selectwindow",
        "set_desktop",
        "set_desktop_for_window",
        "set_desktop_viewport",
        "set_num_desktops",
        "set_window",
        "sleep",
        "type",
        "version",
        "windowactivate",
        "windowclose",
        "windowfocus",
        "windowkill",
        "windowlower",
        "windowmap",
        "windowminimize",
        "windowmove",
        "windowquit",
        "windowraise",
        "windowreparent",
        "windowsize",
        "windowstate",
        "windowunmap",
    }
)


@functools.cache
def _string_to_keysym() -> Callable[[bytes], int] | None:
    path = ctypes.util.find_library("X11")
    if path is None:
        return None
    try:
        fn = ctypes.CDLL(path).XStringToKeysym
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ulong
    fn.argtypes = [ctypes.c_char_p]
    return fn


@functools.lru_cache(maxsize=4096)
def keysym(name: str) -> int:
    """The keysym of ``name`` (0: not a keysym). Needs libX11, not an X server."""
    fn = _string_to_keysym()
    if fn is None:
        raise ActionFailedError("key names cannot be checked: libX11 is not installed")
    return int(fn(name.encode("ascii")))


def check_part(part: str, what: str) -> str:
    """One key of a combination: a keysym, a modifier alias or a key code."""
    if not _PART.fullmatch(part):
        raise BadRequestError(
            f"{what}: {part[:60]!r} is not in xdotool key syntax "
            "(key names such as ctrl, alt, shift, Return, a, F5 joined by '+')"
        )
    if part.lower() in ALIASES or _KEYCODE.fullmatch(part) or keysym(part):
        return part
    raise BadRequestError(f"{what}: unknown key name {part[:60]!r}")


def key_parts(combo: str, what: str) -> list[str]:
    """``ctrl+shift+t`` → ``["ctrl", "shift", "t"]``, each a checked key name."""
    return [check_part(p, what) for p in combo.split("+")]


def argument(parts: list[str]) -> str:
    """Checked keys pressed together → one xdotool argument that is not a command name."""
    if len(parts) == 1 and parts[0].lower() in XDOTOOL_COMMANDS:
        # Only a keysym can get here (aliases and digits are no command names).
        return f"0x{keysym(parts[0]):x}"
    return "+".join(parts)


def combo_argument(combo: str, what: str) -> str:
    """``ctrl+c`` checked and made one safe xdotool argument."""
    return argument(key_parts(combo, what))
