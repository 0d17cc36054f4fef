"""scripts/stop_legs.py: joins the stop traces, and says so when none join."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests._scripts import load_script


def load() -> ModuleType:
    return load_script("stop_legs")


def write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_no_stop_joins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A dispatcher line whose session loadgen never traced, and a loadgen
    # line of another session: nothing joins.
    d = write(tmp_path / "d", ["ses-a 1 2 3 4 5 6 7"])
    lg = write(tmp_path / "lg", ["ses-b 1 2 3 4"])
    w = write(tmp_path / "w", ["5 stop ses-a user"])
    assert load().main(["stop_legs.py", d, lg, w]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stops joined: 0 (dispatcher lines 1)")
    assert "p50" not in out


def test_joined_stop_and_user_stamped_wire_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ms = 1_000_000
    # decided fenced queued taken sent received recorded
    d = write(tmp_path / "d", [f"ses-a {0} {1 * ms} {2 * ms} {3 * ms} {4 * ms} {9 * ms} {10 * ms}"])
    # c_received c_seen c_sending c_sent
    lg = write(tmp_path / "lg", [f"ses-a {6 * ms} {7 * ms} {8 * ms} {8 * ms}"])
    w = write(tmp_path / "w", [f"{5 * ms} stop ses-a", f"{8 * ms} stopped ses-a user"])
    assert load().main(["stop_legs.py", d, lg, w]) == 0
    out = capsys.readouterr().out
    assert "stops joined: 1" in out
    assert "wire rows without a kernel timestamp (stamped later by stopcap): 1" in out
    total = next(line for line in out.splitlines() if line.startswith("decided → stopped received"))
    assert total.split()[-4:] == ["9.000", "9.000", "9.000", "9.000"]
