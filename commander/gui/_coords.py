"""Coordinate conventions: from the model's frame to pixels on the real screen.

Models do not see the screen at its real size. UI-TARS 1.0 and Doubao UI-TARS
answer in a relative frame of 0..1000 on both axes; UI-TARS-1.5 (a Qwen2.5-VL
model) answers in absolute pixels of the image it was given, which its
processor resized with :func:`smart_resize`; a model given the screenshot as is
answers in screen pixels. Each convention here knows the size of the model's
frame for a given screen, and :func:`to_screen` maps and checks one point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from commander.gui._errors import ParseError

#: Qwen2.5-VL / UI-TARS-1.5 image processor defaults.
IMAGE_FACTOR = 28
MIN_PIXELS = 100 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200

#: Largest screen side accepted (no real display is larger).
_MAX_SIDE = 16384


@dataclass(frozen=True, slots=True)
class ScreenSize:
    """The real screen in pixels."""

    width: int
    height: int

    def __post_init__(self) -> None:
        for name, v in (("width", self.width), ("height", self.height)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _MAX_SIDE:
                raise ValueError(f"screen {name} must be an int in 1..{_MAX_SIDE}, got {v!r}")


def _round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def _ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def _floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The size Qwen2.5-VL's image processor resizes an image to, as ``(height, width)``.

    Both sides become multiples of ``factor``, the area lands within
    ``[min_pixels, max_pixels]``, and the aspect ratio is kept as closely as
    possible. This is the standard function of ``qwen_vl_utils`` and UI-TARS,
    including Python's round-half-to-even in the first step.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, _round_by_factor(height, factor))
    w_bar = max(factor, _round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = _floor_by_factor(height / beta, factor)
        w_bar = _floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by_factor(height * beta, factor)
        w_bar = _ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


@dataclass(frozen=True, slots=True)
class Relative1000:
    """0..1000 on both axes, whatever the screen (UI-TARS 1.0, Doubao UI-TARS)."""

    scale: int = 1000

    def frame(self, screen: ScreenSize) -> tuple[int, int]:
        """Width and height of the model's coordinate frame."""
        return self.scale, self.scale

    def describe(self) -> str:
        return f"relative 0..{self.scale}"


@dataclass(frozen=True, slots=True)
class SmartResizedPixels:
    """Pixels of the screenshot after :func:`smart_resize` (UI-TARS-1.5, Qwen2.5-VL)."""

    factor: int = IMAGE_FACTOR
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    def frame(self, screen: ScreenSize) -> tuple[int, int]:
        h, w = smart_resize(
            screen.height, screen.width, self.factor, self.min_pixels, self.max_pixels
        )
        return w, h

    def describe(self) -> str:
        return "absolute pixels of the resized screenshot"


@dataclass(frozen=True, slots=True)
class ScreenPixels:
    """Pixels of the real screen (a model that was shown the screenshot unresized)."""

    def frame(self, screen: ScreenSize) -> tuple[int, int]:
        return screen.width, screen.height

    def describe(self) -> str:
        return "screen pixels"


CoordinateSpace = Relative1000 | SmartResizedPixels | ScreenPixels


def _check_finite(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ParseError(f"coordinate {name} must be a number, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ParseError(f"coordinate {name} must be a finite number, got {v!r}")


def to_screen(x: float, y: float, *, screen: ScreenSize, space: CoordinateSpace) -> tuple[int, int]:
    """Maps a point of the model's frame to a pixel on the screen.

    Rejects NaN, infinities, negatives and points outside the model's frame
    (with a message for the model); a point on the far edge is clamped to the
    last pixel.
    """
    _check_finite("x", x)
    _check_finite("y", y)
    fw, fh = space.frame(screen)
    if not (0 <= x <= fw and 0 <= y <= fh):
        raise ParseError(
            f"coordinate ({_num(x)}, {_num(y)}) is outside the screen: "
            f"in this model's coordinates ({space.describe()}) x must be within 0..{fw} "
            f"and y within 0..{fh}"
        )
    px = min(screen.width - 1, round(x * screen.width / fw))
    py = min(screen.height - 1, round(y * screen.height / fh))
    return px, py


def offset_to_screen(
    dx: float, dy: float, *, screen: ScreenSize, space: CoordinateSpace
) -> tuple[int, int]:
    """Maps a relative move (may be negative) of the model's frame to screen pixels."""
    _check_finite("x offset", dx)
    _check_finite("y offset", dy)
    fw, fh = space.frame(screen)
    if abs(dx) > fw or abs(dy) > fh:
        raise ParseError(
            f"offset ({_num(dx)}, {_num(dy)}) is larger than the screen "
            f"({fw}x{fh} in {space.describe()})"
        )
    return round(dx * screen.width / fw), round(dy * screen.height / fh)


def _num(v: float) -> str:
    if isinstance(v, int):
        text = str(v)
        return text if len(text) <= 12 else text[:12] + "…"
    return str(int(v)) if v.is_integer() and abs(v) < 1e12 else f"{v:g}"
