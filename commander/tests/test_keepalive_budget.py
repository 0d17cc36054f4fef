"""The commander's keepalive finds a frozen dispatcher before a fleet's sweeper may
take its leases over (docs/operations.md "Timing budget"), and never pings more
often than the dispatcher allows. The dispatcher's defaults are read from its Go
source, so a change on either side that breaks the budget fails here."""

from __future__ import annotations

import re
from pathlib import Path

from commander._connection import KEEPALIVE_OPTIONS, ConnectionConfig

GO = Path(__file__).resolve().parents[2] / "dispatcher_go" / "internal"


def go_seconds(path: Path, pattern: str) -> float:
    """The duration (``N * time.Second`` / ``time.Millisecond``) pattern's group finds."""
    m = re.search(pattern, path.read_text())
    assert m, f"{pattern!r} not in {path}"
    n, unit = float(m.group(1)), m.group(2)
    return n if unit == "Second" else n / 1000


def test_keepalive_finds_a_frozen_dispatcher_before_the_sweeper_takes_over() -> None:
    opts = dict(KEEPALIVE_OPTIONS)
    ping, answer = opts["grpc.keepalive_time_ms"] / 1000, opts["grpc.keepalive_timeout_ms"] / 1000
    assert opts["grpc.http2.ping_timeout_ms"] == opts["grpc.keepalive_timeout_ms"]
    fleet = GO / "fleet" / "fleet.go"
    lease = go_seconds(fleet, r"DefaultLease = (\d+) \* time\.(Second|Millisecond)")
    grace = go_seconds(fleet, r"DefaultGrace = (\d+) \* time\.(Second|Millisecond)")
    min_time = go_seconds(
        GO / "dispatcher" / "config.go", r"MinTime: (\d+) \* time\.(Second|Millisecond)"
    )
    # Pings above the dispatcher's EnforcementPolicy.MinTime, with a margin of
    # 3 s: an early ping (timer slack, a loaded commander) never trips
    # too_many_pings.
    assert ping >= min_time + 3, (ping, min_time)
    # Freeze -> found (a ping due at most `ping` later, unanswered for `answer`)
    # -> reconnected (first delay plus jitter, each at most reconnect_initial) and
    # re-attached, before the earliest takeover: the last renewal came up to a
    # third of the lease before the freeze.
    cfg = ConnectionConfig()
    reattached = ping + answer + 2 * cfg.reconnect_initial
    earliest_takeover = lease - lease / 3 + grace
    assert reattached + 1.5 <= earliest_takeover, (reattached, earliest_takeover)
