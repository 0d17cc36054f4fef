"""Sandbox paths stay inside the sandbox's private root."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsandbox._errors import BadRequestError
from localsandbox._files import resolve


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "home" / "agent").mkdir(parents=True)
    return r


@pytest.mark.parametrize(
    ("given", "inside"),
    [
        ("/home/agent/a.txt", "home/agent/a.txt"),
        ("a.txt", "home/agent/a.txt"),
        ("sub/../b.txt", "home/agent/b.txt"),
        ("/tmp/x", "tmp/x"),
        ("/../../../etc/passwd", "etc/passwd"),
        ("../../../../../../etc/shadow", "etc/shadow"),
        ("/", ""),
    ],
)
def test_paths_map_into_the_root(root: Path, given: str, inside: str) -> None:
    assert resolve(root, given) == (root / inside).resolve()


def test_symlink_out_of_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "home" / "agent" / "link").symlink_to(outside)
    with pytest.raises(BadRequestError, match="outside the sandbox"):
        resolve(root, "/home/agent/link/secret")


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 5000])
def test_bad_paths(root: Path, bad: str) -> None:
    with pytest.raises(BadRequestError):
        resolve(root, bad)
