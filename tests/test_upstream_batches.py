"""The commander's upstream batches against the real dispatcher binary.

The dispatcher's hello ack announces ``max_upstream_batch``; a commander whose
writer finds several packets waiting sends them as one ``UpstreamBatch``. The
dispatcher handles each packet as if it came alone, so a watcher sees every
packet exactly once, in order, with the commander's upstream seqs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import pytest

import commander._slot
from commander import Commander, ConnectionConfig, PlannerRegistry, SessionContext
from commander._context import PlannerOutput
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.dispatch.v1 import tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests.conftest import Stack

THOUGHTS = 400

planners = PlannerRegistry()


@planners.register("burst")
async def burst(ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
    for i in range(THOUGHTS):
        yield ipb.ThoughtChain(delta=f"t{i}")  # never folded: one packet each
    yield ipb.FinalResult(outcome=ipb.SESSION_OUTCOME_SUCCESS, result="done")


def test_a_commanders_batches_reach_a_watcher_exactly_once_in_order(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = stack.dispatcher()
    batches: list[int] = []
    make_batch = commander._slot._batch

    def counted(packets: list[ipb.UpstreamPacket]) -> ipb.UpstreamPacket:
        batches.append(len(packets))
        return make_batch(packets)

    monkeypatch.setattr(commander._slot, "_batch", counted)

    def submit_and_watch() -> list[tasks_pb2.TaskEvent]:
        req = tasks_pb2.SubmitTaskRequest(instruction="go", planner="burst")
        task_id = d.tasks.SubmitTask(req, timeout=5).task_id
        events = []
        watch = tasks_pb2.WatchTaskRequest(task_id=task_id)
        for resp in d.tasks.WatchTask(watch, timeout=60):
            events.append(resp.event)
            if resp.event.HasField("state") and resp.event.state.status in (
                agent_pb2.SUCCESS,
                agent_pb2.FAILURE,
                agent_pb2.CANCELLED,
            ):
                break
        return events

    async def main() -> list[tasks_pb2.TaskEvent]:
        with anyio.fail_after(90):
            async with Commander(
                ConnectionConfig(target=d.addr), slots=1, planners=planners, commander_id="b"
            ) as c:
                await c.wait_connected()
                return await anyio.to_thread.run_sync(submit_and_watch)

    events = asyncio.run(main())
    thoughts = [e for e in events if e.HasField("thought")]
    assert [e.thought.delta for e in thoughts] == [f"t{i}" for i in range(THOUGHTS)]
    assert [e.upstream_seq for e in thoughts] == list(range(1, THOUGHTS + 1))
    results = [e for e in events if e.HasField("result")]
    assert len(results) == 1 and results[0].result.result == "done"
    assert events[-1].state.status == agent_pb2.SUCCESS
    # The planner is faster than the stream: packets waited and went in batches,
    # within what the dispatcher announced.
    assert batches and max(batches) <= 256 and sum(batches) <= THOUGHTS + 1
