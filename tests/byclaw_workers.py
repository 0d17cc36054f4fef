"""A byclaw worker of ours for tests/test_byclaw.py (the seed's are byclaw_seed_*.py).

`EveryKind` uses each output the SDK's AgentContext offers a worker: a chunk,
a state, an artifact, a reasoning chunk and a StreamChunkEvent, then returns.
Runs in .venv-byclaw (byclaw-gateway-sdk 0.1.1).
"""

from byclaw_gateway_sdk import AgentContext, GatewayWorker
from byclaw_gateway_sdk.core.protocol.events import ArtifactEvent, StreamChunkEvent

REPORT_URL = "https://files.example.invalid/report.pdf"


class EveryKind(GatewayWorker):
    def get_capabilities(self):  # type: ignore[no-untyped-def]
        return ["every_kind"]

    async def process_command(self, command, context: AgentContext):  # type: ignore[no-untyped-def]
        await context.emit_chunk("part one, ")
        await context.emit_state("working")
        await context.emit_artifact(ArtifactEvent(url=REPORT_URL))
        await context.emit_chunk("weighing the options", event_type="reasoningLogDelta")
        await context.emit_chunk(StreamChunkEvent(content=f"part two: {command.content}"))
        return {"status": "done"}
