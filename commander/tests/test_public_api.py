"""The exported names are exactly the intended public surface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import commander

EXPECTED = {
    # runtime
    "Commander",
    "ConnectionConfig",
    # planners
    "SessionContext",
    "Planner",
    "PlannerOutput",
    "PlannerRegistry",
    "ChatPlanner",
    "LLMSettings",
    "GuiPlanner",
    "GuiSettings",
    # statistics
    "PriceTable",
    "ModelPrice",
    # tool providers
    "ToolProvider",
    "workspace_provider",
    "SandboxSettings",
    "SandboxTools",
    "sandbox_provider",
    # errors: one root
    "CommanderError",
    "PlannerNotFoundError",
    "ModelError",
    "ToolError",
    "UnknownToolError",
    "InvalidToolArgumentsError",
    "ToolTimeoutError",
    "ToolUnavailableError",
    "ToolExecutionError",
    "ToolDeniedError",
    "ToolCancelledError",
    "__version__",
}


def test_all_is_the_intended_surface() -> None:
    assert set(commander.__all__) == EXPECTED
    assert len(commander.__all__) == len(EXPECTED), "duplicates in __all__"


def test_every_exported_name_exists_and_is_public() -> None:
    for name in commander.__all__:
        assert hasattr(commander, name), name
        value = getattr(commander, name)
        if isinstance(value, type) or (callable(value) and hasattr(value, "__code__")):
            assert value.__module__.startswith("commander."), (name, value.__module__)


def test_every_exception_shares_the_root() -> None:
    errors = [
        getattr(commander, n)
        for n in commander.__all__
        if isinstance(getattr(commander, n), type)
        and issubclass(getattr(commander, n), BaseException)
    ]
    assert len(errors) == 11
    for cls in errors:
        assert issubclass(cls, commander.CommanderError), cls
    tool_errors = {cls for cls in errors if cls.__name__.startswith("Tool")}
    tool_errors |= {commander.UnknownToolError, commander.InvalidToolArgumentsError}
    for cls in tool_errors:
        assert issubclass(cls, commander.ToolError), cls


def test_version_is_a_string() -> None:
    assert isinstance(commander.__version__, str) and commander.__version__


def test_the_commander_does_not_import_the_local_sandbox_server() -> None:
    """localsandbox is a product of its own, reached over HTTP; no entry point imports it."""
    entry_points = "commander.__main__, commander.tools_main, commander.sandbox.__main__"
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, {entry_points}\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    loaded = set(done.stdout.split())
    assert "commander.sandbox._tools" in loaded  # the statement did import the commander
    assert not {m for m in loaded if m.split(".")[0] == "localsandbox"}
