"""A tool provider process that accepts invocations and never answers them.

    python -m tests._hanging_provider ADDR

Serves `test.hang` (timeout 30 s) and `test.hang_timeout` (timeout 800 ms).
Prints one line per thing it sees, flushed, so that a test can tell from its log
that a call is in flight before it kills the process:
    WELCOME <tools>
    INVOKED <tool> <invocation_id> <call_id>
    CANCEL <invocation_id> <reason>
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator

import grpc

from commander._gen.dispatch.v1 import interaction_pb2, tools_pb2, tools_pb2_grpc

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
    addr = sys.argv[1]
    outbox: queue.Queue[tools_pb2.ConnectRequest] = queue.Queue()
    outbox.put(
        tools_pb2.ConnectRequest(
            hello=tools_pb2.ProviderHello(provider_id="hang-provider", tools=TOOLS)
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
                print("INVOKED", inv.tool_name, inv.invocation_id, inv.call_id, flush=True)
            elif which == "cancel":
                print("CANCEL", msg.cancel.invocation_id, msg.cancel.reason, flush=True)
            else:
                print("OTHER", which, flush=True)


if __name__ == "__main__":
    main()
