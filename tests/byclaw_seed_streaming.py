# Seed 003 (/work/shared/seeds/003_*.txt, "🧪 示例 / 示例 1: 基础流式输出"): the
# streaming example worker, copied verbatim (indentation restored; the two imports
# it needs, which the seed's snippet leaves out, added above it). Do not edit.
import asyncio

from byclaw_gateway_sdk import AgentContext, GatewayWorker


class StreamingAgent(GatewayWorker):
    def get_capabilities(self):
        return ["streaming_demo"]

    async def process_command(self, command, context: AgentContext):
        text = "这是一段流式输出的示例文本。"
        for char in text:
            await context.emit_chunk(char)
            await asyncio.sleep(0.05)
        return {"status": "done"}
