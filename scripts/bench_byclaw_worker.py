"""The peer's worker for scripts/bench_byclaw.py (runs in .venv-byclaw, Python 3.12+).

A byclaw-gateway-sdk 0.1.1 ``GatewayWorker`` that emits the benchmark's
token-sized chunks (the same texts as scripts/bench_rest.py's
``synthetic_events``) with ``context.emit_chunk`` at the rate the command asks,
each stamped with its emit time (``metadata.t_ns``)::

    python scripts/bench_byclaw_worker.py REDIS_PORT WORKER_ID WORKSPACE
"""

import asyncio
import random
import sys
import time

from byclaw_gateway_sdk import AgentContext, GatewayWorker, run_worker
from byclaw_gateway_sdk.core.protocol.events import StreamChunkEvent

WORDS = (
    "the model streams tokens to the client while a planner thinks about the next action".split()
)


def synthetic_events(n: int) -> list[str]:
    """scripts/bench_rest.py's synthetic_events (8..56 bytes each, seed 1)."""
    rng = random.Random(1)
    out = []
    for _ in range(n):
        text = ""
        target = rng.randint(8, 56)
        while len(text) < target:
            text += rng.choice(WORDS) + " "
        out.append(text[:target])
    return out


class BenchStream(GatewayWorker):
    def get_capabilities(self) -> list[str]:
        return ["bench_stream"]

    async def process_command(self, command, context: AgentContext):  # type: ignore[no-untyped-def]
        params = command.extra_payload
        n, rate = int(params["events"]), float(params["rate"])
        texts = synthetic_events(n)
        start = time.monotonic()
        for i, text in enumerate(texts):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await context.emit_chunk(
                StreamChunkEvent(content=text, metadata={"t_ns": time.time_ns()})
            )
        return {"events": n}


if __name__ == "__main__":
    run_worker(
        worker_class=BenchStream,
        worker_id=sys.argv[2],
        redis_host="127.0.0.1",
        redis_port=int(sys.argv[1]),
        workspace_dir=sys.argv[3],
    )
