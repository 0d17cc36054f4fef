"""A stdio MCP server for the tests, built with the official `mcp` SDK.

    python -m tests._mcp_server        (the dispatcher starts it: --mcp-servers)

Tools: `fast` answers at once; `sha256` hashes its text (no log: for
scripts/bench_mcp.py); `slow` waits `seconds` (default 30) unless it
is cancelled. The server appends what it sees to the file named by
MCP_TEST_LOG, one line each, so that a test can read what happened on the
server's side:

    START <pid>
    FAST <pid> <text>
    SLOW_BEGIN <pid> <tag>
    SLOW_CANCELLED <pid> <tag>     the call was cancelled (notifications/cancelled)
    SLOW_DONE <pid> <tag>
"""

from __future__ import annotations

import hashlib
import os

import anyio
from mcp.server.mcpserver import MCPServer

server = MCPServer("dispatcher-test-tools")


def _append(line: str) -> None:
    with open(os.environ["MCP_TEST_LOG"], "a", encoding="utf-8") as f:
        f.write(line + "\n")


async def record(line: str) -> None:
    """Appends a line to the log (off the event loop; shielded, so that a
    cancelled tool can still record that it was cancelled)."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(_append, line)


@server.tool(description="Answers at once with its text and the server's pid.")
async def fast(text: str) -> dict[str, object]:
    await record(f"FAST {os.getpid()} {text}")
    return {"echo": text, "pid": os.getpid()}


@server.tool(
    description="SHA-256 of a UTF-8 text, hex encoded (what text.sha256 does; for the bench)."
)
async def sha256(text: str) -> dict[str, str]:
    return {"sha256": hashlib.sha256(text.encode()).hexdigest()}


@server.tool(description="Waits `seconds` (default 30), then answers; a cancel ends it.")
async def slow(tag: str, seconds: float = 30.0) -> dict[str, object]:
    await record(f"SLOW_BEGIN {os.getpid()} {tag}")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        await record(f"SLOW_CANCELLED {os.getpid()} {tag}")
        raise
    await record(f"SLOW_DONE {os.getpid()} {tag}")
    return {"tag": tag, "slept": seconds}


def main() -> None:
    _append(f"START {os.getpid()}")
    server.run()


if __name__ == "__main__":
    main()
