"""A remote A2A agent for the ``a2a`` planner's tests, built with the a2a-sdk server.

    python -m tests._a2a_remote WORDS_PER_SEC

Serves JSON-RPC (+SSE) at /a2a and its card at /.well-known/agent-card.json
on a free loopback port, and prints ``LISTENING http://127.0.0.1:PORT``. Its
one skill streams STORY word by word as chunks of one artifact (WORKING), then
completes the task. The log tells a test what the agent saw:

    EXECUTE <task_id>
    CANCEL <task_id> <unix time>     (the framework called cancel: CancelTask arrived)
    ABORTED <task_id>                (its execution was cancelled)
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import uvicorn
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Part,
)
from starlette.applications import Starlette

STORY = (
    "Once upon a time the night operator of the old station walked to the vault "
    "and read the launch codes out loud while the radio kept humming softly and the "
    "rain went on falling over the empty yard until morning came at last to everyone"
)


def say(line: str) -> None:
    print(line, flush=True)


class StoryTeller(AgentExecutor):
    def __init__(self, rate: float) -> None:
        self.rate = rate

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task = context.current_task
        if task is None:
            assert context.message is not None
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        say(f"EXECUTE {task.id}")
        await updater.start_work()
        words = STORY.split(" ")
        try:
            for i, w in enumerate(words):
                await updater.add_artifact(
                    [Part(text=(" " if i else "") + w)],
                    artifact_id="story",
                    name="story",
                    append=i > 0,
                    last_chunk=i == len(words) - 1,
                )
                await asyncio.sleep(1 / self.rate)
            await updater.complete()
        except asyncio.CancelledError:
            say(f"ABORTED {task.id}")
            raise

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        say(f"CANCEL {context.task_id} {time.time():.6f}")
        assert context.task_id and context.context_id
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


async def main(rate: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    card = AgentCard(
        name="storyteller",
        description="Streams a story word by word.",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=url + "/a2a", protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="story", name="story", description="tells a story", tags=["story"])],
    )
    handler = DefaultRequestHandler(
        agent_executor=StoryTeller(rate), task_store=InMemoryTaskStore(), agent_card=card
    )
    app = Starlette(
        routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, "/a2a")]
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    say(f"LISTENING {url}")
    await server.serve(sockets=[sock])


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0))
