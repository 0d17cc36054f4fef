"""A tool provider process with GUI-like tools that answer at once.

    python -m tests._gui_provider ADDR

Serves `computer.click` and `computer.type` (names as the sandbox provider
uses them; the commander of the tests runs no sandbox, so the names are free).
Each invocation is answered with a small JSON result; the log (see
tests/_rawprovider.py) tells a test what ran.
"""

from __future__ import annotations

import json
import sys

from commander._gen.dispatch.v1 import interaction_pb2, tools_pb2
from tests._rawprovider import serve

_XY = (
    '{"type":"object","properties":{"x":{"type":"integer"},"y":{"type":"integer"}},'
    '"required":["x","y"]}'
)
TOOLS = [
    interaction_pb2.ToolSpec(
        name="computer.click",
        description="Click at (x, y) on the screen.",
        parameters_json_schema=_XY,
        timeout_ms=5_000,
    ),
    interaction_pb2.ToolSpec(
        name="computer.type",
        description="Type text.",
        parameters_json_schema='{"type":"object","properties":{"text":{"type":"string"}}}',
        timeout_ms=5_000,
    ),
]


def _answer(inv: tools_pb2.Invocation) -> str:
    return json.dumps({"done": inv.tool_name, "args": json.loads(inv.arguments_json or "{}")})


def main() -> None:
    serve(sys.argv[1], "gui-provider", TOOLS, _answer)


if __name__ == "__main__":
    main()
