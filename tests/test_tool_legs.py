"""scripts/tool_legs.py's socket legs: every nanosecond of a call's round
trip is charged once, to the client (loadgen) or the server (dispatcher)."""

from __future__ import annotations

from types import ModuleType

from tests._scripts import load_script


def load() -> ModuleType:
    return load_script("tool_legs")


def split(mod: ModuleType, legs: list[int]) -> tuple[int, int]:
    client = sum(v for (side, _), v in zip(mod.SOCKET_LEGS, legs, strict=True) if side == "client")
    server = sum(v for (side, _), v in zip(mod.SOCKET_LEGS, legs, strict=True) if side == "server")
    return client, server


def test_builtin_call_is_split_at_the_sockets() -> None:
    mod = load()
    # loadgen: sent 0, written on conn 5 at 10, result read on conn 5 at 100,
    # Recv 110, taken 115. A watcher connection (7) reads the marker too.
    lm = [("w", 5, 10), ("r", 7, 90), ("r", 5, 100)]
    # dispatcher: read on conn 2 at 30, result written on conn 2 at 80; the
    # watcher's copy written on conn 9 first.
    dm = [("r", 2, 30), ("w", 9, 60), ("w", 2, 80)]
    # emitted, received, dispatched, resulted, pushed, taken, done (Send returned)
    d = [0, 40, 50, 50, 55, 60, 70]
    legs = mod.socket_legs(d, 0, 110, 115, dm, lm)
    assert legs == [10, 20, 10, 30, 10, 20, 15, 0, 0, 0, 0, 0]
    assert sum(legs) == 115
    assert split(mod, legs) == (10 + 20 + 15, 20 + 10 + 30 + 10)


def test_provider_call_charges_the_provider_to_the_client() -> None:
    mod = load()
    # loadgen: call written on conn 5 at 10; invoke read on the provider's
    # conn 1 at 60, answered at 70; result read on conn 5 at 160.
    lm = [("w", 5, 10), ("r", 1, 60), ("w", 1, 70), ("r", 5, 160), ("r", 7, 200)]
    # dispatcher: call read on conn 2 at 20, invoke written on conn 3 at 45,
    # answer read there at 80, result written on conn 2 at 150; a watcher's
    # conn 9 gets the marker one way only.
    dm = [("r", 2, 20), ("w", 3, 45), ("w", 9, 50), ("r", 3, 80), ("w", 2, 150)]
    d = [0, 30, 40, 90, 100, 110, 120]
    legs = mod.socket_legs(d, 0, 170, 175, dm, lm)
    assert legs is not None
    assert sum(legs) == 175
    client, server = split(mod, legs)
    assert client == 10 + 10 + 15 + (60 - 45) + (70 - 60)
    assert server == 175 - client


def test_a_missing_crossing_drops_the_call() -> None:
    mod = load()
    d = [0, 40, 50, 50, 55, 60, 70]
    assert mod.socket_legs(d, 0, 110, 115, [("r", 2, 30)], [("w", 5, 10), ("r", 5, 100)]) is None
