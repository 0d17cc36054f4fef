"""Key names: what models write (pyautogui, UI-TARS) to xdotool key syntax.

The SDK's keyboard actions take keys "in xdotool key syntax" (``ctrl+c``,
``Return``, ``KP_0``). Models write pyautogui's names (``enter``, ``pgdn``,
``winleft``) or UI-TARS' (``ctrl c``, ``arrowleft``). Only names in this table
or single printable characters are accepted, so a key string can never smuggle
an option or a command into the tool that presses it (xdotool runs
``key a exec touch f`` as "press a, then run touch").

The same table checks the ``computer.*`` tools' key arguments
(:func:`xdotool_keys`), whoever calls them: the gui planner, another planner, or
a model calling the tools directly.
"""

from __future__ import annotations

import re

from commander.gui._errors import ParseError

# Named keys, by lower-case spelling. Values are X keysyms, or xdotool's own
# modifier aliases (ctrl, alt, shift, super), which press the left-hand key.
_NAMED: dict[str, str] = {
    # modifiers
    "ctrl": "ctrl",
    "control": "ctrl",
    "ctrlleft": "ctrl",
    "ctrlright": "Control_R",
    "control_l": "Control_L",
    "shift": "shift",
    "shiftleft": "shift",
    "shiftright": "Shift_R",
    "shift_l": "Shift_L",
    "alt": "alt",
    "altleft": "alt",
    "altright": "Alt_R",
    "alt_l": "Alt_L",
    "option": "alt",
    "optionleft": "alt",
    "optionright": "Alt_R",
    "win": "super",
    "winleft": "super",
    "winright": "Super_R",
    "super_l": "Super_L",
    "meta_l": "Meta_L",
    "meta_r": "Meta_R",
    "super": "super",
    "meta": "super",
    "cmd": "super",
    "command": "super",
    # editing and navigation
    "enter": "Return",
    "kp_enter": "KP_Enter",
    "return": "Return",
    "tab": "Tab",
    "space": "space",
    "spacebar": "space",
    "backspace": "BackSpace",
    "delete": "Delete",
    "del": "Delete",
    "insert": "Insert",
    "esc": "Escape",
    "escape": "Escape",
    "home": "Home",
    "end": "End",
    "pageup": "Page_Up",
    "pgup": "Page_Up",
    "prior": "Page_Up",
    "page_up": "Page_Up",
    "pagedown": "Page_Down",
    "pgdn": "Page_Down",
    "next": "Page_Down",
    "page_down": "Page_Down",
    "up": "Up",
    "down": "Down",
    "left": "Left",
    "right": "Right",
    "arrowup": "Up",
    "arrowdown": "Down",
    "arrowleft": "Left",
    "arrowright": "Right",
    "capslock": "Caps_Lock",
    "caps_lock": "Caps_Lock",
    "numlock": "Num_Lock",
    "num_lock": "Num_Lock",
    "scrolllock": "Scroll_Lock",
    "scroll_lock": "Scroll_Lock",
    "pause": "Pause",
    "print": "Print",
    "printscreen": "Print",
    "prtsc": "Print",
    "prtscr": "Print",
    "prntscrn": "Print",
    "apps": "Menu",
    "menu": "Menu",
    "help": "Help",
    "select": "Select",
    "execute": "Execute",
    "clear": "Clear",
    # numeric keypad
    "add": "KP_Add",
    "subtract": "KP_Subtract",
    "multiply": "KP_Multiply",
    "divide": "KP_Divide",
    "decimal": "KP_Decimal",
    "separator": "KP_Separator",
    # media
    "volumeup": "XF86AudioRaiseVolume",
    "volumedown": "XF86AudioLowerVolume",
    "volumemute": "XF86AudioMute",
    "playpause": "XF86AudioPlay",
    "nexttrack": "XF86AudioNext",
    "prevtrack": "XF86AudioPrev",
    "stop": "XF86AudioStop",
    "browserback": "XF86Back",
    "browserforward": "XF86Forward",
    "browserrefresh": "XF86Refresh",
}
for _i in range(1, 25):
    _NAMED[f"f{_i}"] = f"F{_i}"
for _i in range(10):
    _NAMED[f"num{_i}"] = f"KP_{_i}"
    _NAMED[f"kp_{_i}"] = f"KP_{_i}"
# Keysyms themselves, in any case ("Return", "BackSpace", "KP_Add").
for _sym in list(_NAMED.values()):
    _NAMED.setdefault(_sym.lower(), _sym)

# Single characters that are not letters or digits, by keysym name.
_CHARS: dict[str, str] = {
    " ": "space",
    "\n": "Return",
    "\r": "Return",
    "\t": "Tab",
    "\b": "BackSpace",
    "!": "exclam",
    '"': "quotedbl",
    "#": "numbersign",
    "$": "dollar",
    "%": "percent",
    "&": "ampersand",
    "'": "apostrophe",
    "(": "parenleft",
    ")": "parenright",
    "*": "asterisk",
    "+": "plus",
    ",": "comma",
    "-": "minus",
    ".": "period",
    "/": "slash",
    ":": "colon",
    ";": "semicolon",
    "<": "less",
    "=": "equal",
    ">": "greater",
    "?": "question",
    "@": "at",
    "[": "bracketleft",
    "\\": "backslash",
    "]": "bracketright",
    "^": "asciicircum",
    "_": "underscore",
    "`": "grave",
    "{": "braceleft",
    "|": "bar",
    "}": "braceright",
    "~": "asciitilde",
}
for _sym in list(_CHARS.values()):
    _NAMED.setdefault(_sym.lower(), _sym)

_ALNUM = re.compile(r"[A-Za-z0-9]")

#: Most keys one hotkey may combine.
MAX_COMBO = 6
#: Most combinations one key sequence (``ctrl+a BackSpace``) may hold.
MAX_SEQUENCE = 16


def key_to_xdotool(name: str) -> str:
    """One key name to its xdotool keysym; :class:`ParseError` for an unknown name."""
    if not isinstance(name, str) or not name:
        raise ParseError(f"a key must be a non-empty string, got {name!r}")
    if len(name) == 1:
        if _ALNUM.fullmatch(name):
            return name
        if name in _CHARS:
            return _CHARS[name]
        raise ParseError(f"unsupported key character {name!r}")
    sym = _NAMED.get(name.strip().lower())
    if sym is None:
        raise ParseError(
            f"unknown key name {name[:40]!r}; use names like enter, esc, tab, backspace, "
            "ctrl, alt, shift, up, pagedown, f5, or a single character"
        )
    return sym


def combo_to_xdotool(keys: list[str]) -> str:
    """Keys pressed together (``["ctrl", "c"]``) to one xdotool combo (``ctrl+c``)."""
    if not keys:
        raise ParseError("a hotkey needs at least one key")
    if len(keys) > MAX_COMBO:
        raise ParseError(f"a hotkey combines at most {MAX_COMBO} keys, got {len(keys)}")
    return "+".join(key_to_xdotool(k) for k in keys)


def split_combo(text: str) -> list[str]:
    """UI-TARS writes combos as ``ctrl c``; some models write ``ctrl+c``. Both work.

    A lone ``+`` (or a trailing one, as in ``ctrl++``) is the plus key.
    """
    parts: list[str] = []
    for token in text.split():
        if len(token) > 1 and "+" in token:
            pieces = token.split("+")
            # "ctrl++" -> ["ctrl", "", ""]: the empty tail stands for the plus key.
            named = [p for p in pieces if p]
            if len(named) != len(pieces):
                named.append("+")
            parts.extend(named)
        else:
            parts.append(token)
    return parts


def xdotool_keys(text: str, *, sequence: bool = True) -> str:
    """A key string in xdotool syntax, checked against this module's table and
    written in its keysyms: ``ctrl+c``, ``Return``, ``alt+F4``, and with
    ``sequence`` several combinations separated by spaces (``ctrl+a BackSpace``).

    Names are the ones :func:`key_to_xdotool` knows (so ``enter`` becomes
    ``Return``); anything else — ``exec``, an option, a path — is a
    :class:`ParseError`. The result is a fixed point: checking it again gives it back.
    """
    if not isinstance(text, str):
        raise ParseError(f"keys must be a string, got {type(text).__name__}")
    combos = text.split()
    if not combos:
        raise ParseError("no key given")
    if not sequence and len(combos) > 1:
        raise ParseError(f"one key combination expected (keys joined by '+'), got {text[:60]!r}")
    if len(combos) > MAX_SEQUENCE:
        raise ParseError(f"at most {MAX_SEQUENCE} key combinations, got {len(combos)}")
    return " ".join(combo_to_xdotool(split_combo(c)) for c in combos)
