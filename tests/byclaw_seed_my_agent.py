# Seed 003 (/work/shared/seeds/003_*.txt, "🚀 快速上手 / 1. 创建一个简单的 Agent Worker"):
# the quick-start worker, copied verbatim (only the indentation, lost in the seed's
# text, restored). Do not edit: the byclaw tests show that this unmodified file,
# run by byclaw-gateway-sdk 0.1.1 from PyPI in .venv-byclaw, serves our tasks.
# The tests start it the way the seed's deployment guide does
# (`python -m byclaw_gateway_sdk --worker-class ... --redis-port ...`), so the
# __main__ block below (fixed to localhost:6379) is not what runs it.
import asyncio
from byclaw_gateway_sdk import GatewayWorker, AgentContext, run_worker

class MyAssistant(GatewayWorker):
    def get_capabilities(self):
        # 声明此 Worker 能够处理的 Agent 类型
        return ["weather_agent", "chat_agent"]

    async def process_command(self, command, context: AgentContext):
        # 发送流式文本片段
        await context.emit_chunk("正在处理您的请求...\n")

        # 模拟耗时操作
        await asyncio.sleep(0.5)

        # 更新任务状态
        await context.emit_state("thinking")

        # 从 command 中获取用户输入
        user_input = command.data.get("input", "")

        # 发送思考过程
        await context.emit_chunk(f"我收到了: {user_input}\n")
        await asyncio.sleep(0.3)

        # 发送最终结果
        await context.emit_chunk("这是我的回复!")

        return {
            "status": "success",
            "message": "任务完成",
            "data": {"answer": "今天天气晴朗"}
        }

if __name__ == "__main__":
    run_worker(
        worker_class=MyAssistant,
        worker_id="worker-01",
        redis_host="localhost",
        redis_port=6379,
    )
