"""Coordinate conventions: smart_resize and the mapping to screen pixels."""

from __future__ import annotations

import math

import pytest

from commander.gui import ParseError, Relative1000, ScreenPixels, ScreenSize, SmartResizedPixels
from commander.gui import smart_resize as resize
from commander.gui._coords import MAX_PIXELS, MIN_PIXELS, offset_to_screen, to_screen


@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [
        (1080, 1920, (1092, 1932)),  # 38.57 -> 39 and 68.57 -> 69 units of 28
        (768, 1366, (756, 1372)),  # 27.43 -> 27, 48.79 -> 49
        (720, 1280, (728, 1288)),  # 25.71 -> 26, 45.71 -> 46
        (28, 28, (280, 280)),  # below min_pixels: scaled up to 100 units of 28x28
        (10, 10, (280, 280)),
        (2800, 2800, (2800, 2800)),  # already a multiple of 28, within bounds
    ],
)
def test_smart_resize_known_sizes(h: int, w: int, expected: tuple[int, int]) -> None:
    assert resize(h, w) == expected


@pytest.mark.parametrize(
    ("h", "w"),
    [(1080, 1920), (1, 150), (4000, 6000), (10000, 20000), (1440, 2560), (601, 799), (99, 19000)],
)
def test_smart_resize_invariants(h: int, w: int) -> None:
    rh, rw = resize(h, w)
    assert rh % 28 == 0 and rw % 28 == 0
    assert MIN_PIXELS <= rh * rw <= MAX_PIXELS
    # The aspect ratio is kept to within one unit of 28 on each side.
    assert abs(rw / rh - w / h) <= (w / h) * (28 / min(rh, rw)) * 2 + 1e-9


def test_smart_resize_large_image_is_scaled_down() -> None:
    rh, rw = resize(10000, 20000)
    beta = math.sqrt(10000 * 20000 / MAX_PIXELS)
    assert (rh, rw) == (math.floor(10000 / beta / 28) * 28, math.floor(20000 / beta / 28) * 28)


def test_smart_resize_rejects_extreme_aspect_ratio() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        resize(10, 2500)


def test_smart_resize_custom_bounds() -> None:
    h, w = resize(1080, 1920, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    assert h * w <= 1280 * 28 * 28 and h % 28 == 0 and w % 28 == 0
    frame = SmartResizedPixels(max_pixels=1280 * 28 * 28).frame(ScreenSize(1920, 1080))
    assert frame == (w, h)


S = ScreenSize(1920, 1080)


@pytest.mark.parametrize(
    ("space", "x", "y", "px"),
    [
        (Relative1000(), 0, 0, (0, 0)),
        (Relative1000(), 500, 500, (960, 540)),
        (Relative1000(), 1000, 1000, (1919, 1079)),
        (Relative1000(), 999.9, 0.4, (1919, 0)),
        (SmartResizedPixels(), 966, 546, (960, 540)),
        (SmartResizedPixels(), 1932, 1092, (1919, 1079)),
        (ScreenPixels(), 1919, 1079, (1919, 1079)),
        (ScreenPixels(), 1920, 1080, (1919, 1079)),
    ],
)
def test_to_screen(
    space: Relative1000 | SmartResizedPixels | ScreenPixels, x: float, y: float, px: tuple[int, int]
) -> None:
    assert to_screen(x, y, screen=S, space=space) == px


@pytest.mark.parametrize(
    ("x", "y", "says"),
    [
        (-1, 0, "outside"),
        (0, -0.5, "outside"),
        (1000.5, 0, "outside"),
        (float("nan"), 0, "finite"),
        (float("inf"), 0, "finite"),
        (0, float("-inf"), "finite"),
        (10**100, 0, "outside"),
        (True, 0, "number"),
    ],
)
def test_to_screen_rejects_absurd(x: float, y: float, says: str) -> None:
    with pytest.raises(ParseError, match=says):
        to_screen(x, y, screen=S, space=Relative1000())


def test_offsets_scale_and_may_be_negative() -> None:
    assert offset_to_screen(-500, 250, screen=S, space=Relative1000()) == (-960, 270)
    with pytest.raises(ParseError, match="larger than the screen"):
        offset_to_screen(1001, 0, screen=S, space=Relative1000())


@pytest.mark.parametrize("bad", [0, -1, 20000, 1.5, True])
def test_screen_size_validates(bad: int) -> None:
    with pytest.raises(ValueError):
        ScreenSize(bad, 100)
