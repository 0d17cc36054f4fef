"""A tool provider process with GUI-like tools that answer at once.

    python -m tests._gui_provider ADDR

Serves `computer.click` and `computer.type` (names as the sandbox provider
uses them; the commander of the tests runs no sandbox, so the names are free).
Each invocation is answered with a small JSON result. Prints one line per thing
it sees, flushed, so that a test can tell from its log what ran:
    WELCOME <tools>
    INVOKED <tool> <invocation_id> <call_id> <arguments_json>
    CANCEL <invocation_id> <reason>
"""

from __future__ import annotations

import json
import queue
import sys
from collections.abc import Iterator

import grpc

from commander._gen.dispatch.v1 import interaction_pb2, tools_pb2, tools_pb2_grpc

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


def main() -> None:
    addr = sys.argv[1]
    outbox: queue.Queue[tools_pb2.ConnectRequest] = queue.Queue()
    outbox.put(
        tools_pb2.ConnectRequest(
            hello=tools_pb2.ProviderHello(provider_id="gui-provider", tools=TOOLS)
        )
    )

    def requests() -> Iterator[tools_pb2.ConnectRequest]:
        while True:
            yield outbox.get()

    with grpc.insecure_channel(addr) as channel:
        stub = tools_pb2_grpc.ToolProviderServiceStub(channel)
        for msg in stub.Connect(requests()):
            which = msg.WhichOneof("msg")
            if which == "welcome":
                print("WELCOME", ",".join(msg.welcome.registered_tools), flush=True)
            elif which == "invoke":
                inv = msg.invoke
                print(
                    "INVOKED",
                    inv.tool_name,
                    inv.invocation_id,
                    inv.call_id,
                    inv.arguments_json,
                    flush=True,
                )
                args = json.loads(inv.arguments_json or "{}")
                outbox.put(
                    tools_pb2.ConnectRequest(
                        result=tools_pb2.InvocationResult(
                            invocation_id=inv.invocation_id,
                            result_json=json.dumps({"done": inv.tool_name, "args": args}),
                        )
                    )
                )
            elif which == "cancel":
                print("CANCEL", msg.cancel.invocation_id, msg.cancel.reason, flush=True)
            else:
                print("OTHER", which, flush=True)


if __name__ == "__main__":
    main()
