"""The local sandbox server is a product of its own: it does not import the commander."""

from __future__ import annotations

import subprocess
import sys

from localsandbox.tests.harness import ROOT


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    done = subprocess.run(
        [sys.executable, "-c", f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    return set(done.stdout.split())


def test_the_server_does_not_import_the_commander() -> None:
    loaded = modules_after("import localsandbox, localsandbox.__main__")
    assert "localsandbox._server" in loaded  # the statement did import the server
    assert not {m for m in loaded if m.split(".")[0] == "commander"}
