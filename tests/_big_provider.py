"""A bare tool provider whose one tool answers with 6 MiB (issue 12, class 5).

    python -m tests._big_provider ADDR

Serves `test.big` (answers at once with a 6 MiB JSON string, without any
size check of its own: the dispatcher's check is what is tested) and
`test.held` (answered only once a `test.big` call was answered, so that it is
in flight on the same stream when the big result arrives). Logs as
tests/_rawprovider.py does, plus `SENT <invocation_id> <bytes>`.
"""

from __future__ import annotations

import json
import queue
import sys
from collections.abc import Iterator

import grpc

from commander._gen.dispatch.v1 import interaction_pb2, tools_pb2, tools_pb2_grpc

BIG_BYTES = 6 * 1024 * 1024

TOOLS = [
    interaction_pb2.ToolSpec(
        name="test.big",
        description="Answers with 6 MiB.",
        parameters_json_schema='{"type":"object"}',
        timeout_ms=20_000,
    ),
    interaction_pb2.ToolSpec(
        name="test.held",
        description="Answers once a test.big call was answered.",
        parameters_json_schema='{"type":"object"}',
        timeout_ms=60_000,
    ),
]


def result(invocation_id: str, result_json: str) -> tools_pb2.ConnectRequest:
    return tools_pb2.ConnectRequest(
        result=tools_pb2.InvocationResult(invocation_id=invocation_id, result_json=result_json)
    )


def main() -> None:
    outbox: queue.Queue[tools_pb2.ConnectRequest] = queue.Queue()
    hello = tools_pb2.ProviderHello(provider_id="big-provider", tools=TOOLS)
    outbox.put(tools_pb2.ConnectRequest(hello=hello))

    def requests() -> Iterator[tools_pb2.ConnectRequest]:
        while True:
            message = outbox.get()
            if message.HasField("result"):
                print("SENT", message.result.invocation_id, message.ByteSize(), flush=True)
            yield message

    held: list[str] = []
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = tools_pb2_grpc.ToolProviderServiceStub(channel)
        for msg in stub.Connect(requests()):
            which = msg.WhichOneof("msg")
            if which == "welcome":
                print(
                    "WELCOME",
                    ",".join(msg.welcome.registered_tools),
                    msg.welcome.max_message_bytes,
                    flush=True,
                )
            elif which == "invoke":
                inv = msg.invoke
                print("INVOKED", inv.tool_name, inv.invocation_id, flush=True)
                if inv.tool_name == "test.held":
                    held.append(inv.invocation_id)
                    continue
                outbox.put(result(inv.invocation_id, json.dumps("x" * BIG_BYTES)))
                for iid in held:
                    outbox.put(result(iid, json.dumps({"held": "answered"})))
                held.clear()
            else:
                print("OTHER", which, flush=True)
    print("STREAM ENDED", flush=True)


if __name__ == "__main__":
    main()
