"""A tool provider process that accepts invocations and never answers them.

    python -m tests._hanging_provider ADDR

Serves `test.hang` (timeout 30 s) and `test.hang_timeout` (timeout 800 ms).
Its log (see tests/_rawprovider.py) tells a test that a call is in flight
before it kills the process.
"""

from __future__ import annotations

import sys

from commander._gen.dispatch.v1 import interaction_pb2
from tests._rawprovider import serve

TOOLS = [
    interaction_pb2.ToolSpec(
        name="test.hang",
        description="Never returns.",
        parameters_json_schema='{"type":"object"}',
        timeout_ms=30_000,
    ),
    interaction_pb2.ToolSpec(
        name="test.hang_timeout",
        description="Never returns; times out after 800 ms.",
        parameters_json_schema='{"type":"object"}',
        timeout_ms=800,
    ),
]


def main() -> None:
    serve(sys.argv[1], "hang-provider", TOOLS, lambda _inv: None)


if __name__ == "__main__":
    main()
