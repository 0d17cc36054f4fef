"""A bare tool-provider process for the cross-process tests (sync grpc, no commander code).

`serve` connects, registers `tools`, and prints one flushed line per thing it
sees, so that a test can tell from the process log what happened:
    WELCOME <tools>
    INVOKED <tool> <invocation_id> <call_id> <arguments_json>
    CANCEL <invocation_id> <reason>
`answer` gives the result JSON of an invocation, or None to never answer it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence

import grpc

from commander._gen.dispatch.v1 import interaction_pb2, tools_pb2, tools_pb2_grpc


def serve(
    addr: str,
    provider_id: str,
    tools: Sequence[interaction_pb2.ToolSpec],
    answer: Callable[[tools_pb2.Invocation], str | None],
) -> None:
    outbox: queue.Queue[tools_pb2.ConnectRequest] = queue.Queue()
    hello = tools_pb2.ProviderHello(provider_id=provider_id, tools=tools)
    outbox.put(tools_pb2.ConnectRequest(hello=hello))

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
                result = answer(inv)
                if result is not None:
                    outbox.put(
                        tools_pb2.ConnectRequest(
                            result=tools_pb2.InvocationResult(
                                invocation_id=inv.invocation_id, result_json=result
                            )
                        )
                    )
            elif which == "cancel":
                print("CANCEL", msg.cancel.invocation_id, msg.cancel.reason, flush=True)
            else:
                print("OTHER", which, flush=True)
