"""Property: the workspace tools never touch anything outside their root.

For arbitrary path strings (``..``, absolute paths, symlinks planted in the
workspace that lead out, NUL, unicode, very long names) every call of
``write_file``, ``read_file`` and ``list_files`` either acts inside the root
or raises the tool error; a sentinel directory next to the root is never
changed, never read into a result, and nothing new appears beside the root.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from commander._errors import ToolError
from commander._workspace import Workspace

SECRET = "sentinel-secret-outside-the-workspace"

#: Path pieces that matter to confinement; the rest comes from st.text().
SEGMENTS = [
    "..",
    ".",
    "",
    "a",
    "sub",
    "outside",
    "sentinel.txt",
    "link_dir_out",
    "link_file_out",
    "link_abs_out",
    "link_in",
    "link_loop",
    "dangling_out",
    "\x00",
    "ü😀",
    "\u202e",
    "~",
    "\\..",
    "x" * 300,
]


@dataclass
class Layout:
    base: Path
    root: Path
    outside: Path


@contextmanager
def layout() -> Iterator[Layout]:
    """A root with symlinks that lead out, beside a sentinel directory."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp).resolve()
        outside = base / "outside"
        outside.mkdir()
        (outside / "sentinel.txt").write_text(SECRET)
        (outside / "inner").mkdir()
        (outside / "inner" / "deep.txt").write_text(SECRET)
        root = base / "root"
        root.mkdir()
        (root / "sub").mkdir()
        (root / "a").write_text("inside")
        os.symlink("../outside", root / "link_dir_out")
        os.symlink("../outside/sentinel.txt", root / "link_file_out")
        os.symlink(outside, root / "link_abs_out")
        os.symlink(".", root / "link_in")
        os.symlink("link_loop", root / "link_loop")
        os.symlink("../outside/not-there-yet", root / "dangling_out")
        os.symlink("../../outside", root / "sub" / "up_out")
        yield Layout(base=base, root=root, outside=outside)


def snapshot(path: Path) -> dict[str, Any]:
    """Every entry below path (not following links) with its content and times."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            content = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(path))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, content)
    return out


def segment_paths() -> st.SearchStrategy[str]:
    pieces = st.lists(st.one_of(st.sampled_from(SEGMENTS), st.text(max_size=12)), max_size=8)
    return st.builds(
        lambda lead, parts, trail: lead + "/".join(parts) + trail,
        st.sampled_from(["", "/", "./", "../", "//", str(Path(tempfile.gettempdir()))]),
        pieces,
        st.sampled_from(["", "/", "/.", "/.."]),
    )


paths = st.one_of(
    segment_paths(),
    st.text(max_size=64),
    st.text(alphabet=st.sampled_from("./\\x\x00ü"), max_size=64),
    st.integers(min_value=200, max_value=5000).map(lambda n: "a" * n),
    st.integers(min_value=2, max_value=400).map(lambda n: "a/" * n + "f"),
)


def call(ws: Workspace, op: str, path: str, flag: bool) -> dict[str, Any]:
    if op == "write":
        return ws.write_file(path, "written by the property test", append=flag)
    if op == "read":
        return ws.read_file(path)
    return ws.list_files(path, recursive=flag)


# No wall-clock deadline: each example builds a directory tree on a disk the
# other tests (PostgreSQL, builds) keep busy, and a shared CI machine can stall
# one for seconds; Hypothesis would call that Flaky. What is checked is where
# the tools write, not how fast.
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(op=st.sampled_from(["write", "read", "list"]), path=paths, flag=st.booleans())
@example(op="write", path="link_file_out", flag=False)
@example(op="write", path="link_file_out", flag=True)
@example(op="write", path="link_dir_out/sentinel.txt", flag=False)
@example(op="write", path="link_abs_out/new.txt", flag=False)
@example(op="write", path="dangling_out", flag=False)
@example(op="write", path="sub/up_out/new.txt", flag=False)
@example(op="write", path="link_dir_out/newdir/f", flag=False)
@example(op="write", path="../outside/sentinel.txt", flag=False)
@example(op="write", path="link_in/link_dir_out/x", flag=False)
@example(op="read", path="link_file_out", flag=False)
@example(op="read", path="link_loop", flag=False)
@example(op="list", path="link_dir_out", flag=True)
@example(op="list", path=".", flag=True)
@example(op="list", path="sub", flag=True)
@example(op="write", path="a\x00b", flag=False)
@example(op="write", path="a" * 5000, flag=False)
@example(op="read", path="/etc/passwd", flag=False)
def test_workspace_tools_stay_inside(op: str, path: str, flag: bool) -> None:
    with layout() as lay:
        ws = Workspace(lay.root)
        before_outside = snapshot(lay.outside)
        before_base = sorted(p.name for p in lay.base.iterdir())
        try:
            result = call(ws, op, path, flag)
        except ToolError:
            result = None
        except OSError as exc:
            # The provider turns this into EXECUTION_FAILED: still an error,
            # but only for an OS limit on a path inside the root.
            assert exc.errno is not None, exc
            result = None
        assert snapshot(lay.outside) == before_outside, f"{op} {path!r} changed the outside"
        assert sorted(p.name for p in lay.base.iterdir()) == before_base
        if result is None:
            return
        assert SECRET not in repr(result), f"{op} {path!r} read outside: {result!r}"
        returned = [result["path"]] + [e["path"] for e in result.get("entries", [])]
        for rel in returned:
            assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, rel
            full = lay.root / rel
            # What a result names is inside the root (a link entry itself is).
            target = full.parent.resolve() / full.name if full.is_symlink() else full.resolve()
            assert target == lay.root or lay.root in target.parents, (op, path, rel)
