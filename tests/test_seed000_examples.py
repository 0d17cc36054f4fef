"""The client examples of seed 000 (lybic.agent.Agent, Python grpc.aio) run against
the dispatcher, with real commander processes and the scripted model server.

The examples are kept as close to the seed as possible; where they print, these
collect what they would print and assert on it. Differences are marked "seed:".
"""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import grpc
import pytest

from commander._gen.lybic.agent import agent_pb2, agent_pb2_grpc
from tests._client import wait_status
from tests.conftest import Stack

pytestmark = pytest.mark.e2e

# The scripted model's answer to any first turn (the commander's first request).
REASONING = "The user wants one plus one computed."
ANSWER = "Opened the calculator. One plus one is 2, shown on the display of the calculator app."

GROUNDING_MODEL = "doubao-1-5-ui-tars-250428"
ACTION_MODEL = "claude-sonnet-4-20250514"


@pytest.fixture(scope="module")
def env(module_stack: Stack) -> SimpleNamespace:
    # 50 tokens/s: a task lasts about half a second, long enough for a stream
    # and a poll to run side by side.
    llm = module_stack.scripted([{"reasoning": REASONING, "content": ANSWER}], tokens_per_sec=50)
    slow = module_stack.scripted(tokens_per_sec=50, tokens=500)
    d = module_stack.dispatcher()
    module_stack.commander(d, llm.base_url, slots=2, wait_slots=2)
    return SimpleNamespace(llm=llm, slow=slow, d=d, addr=d.addr)


def unique(text: str) -> str:
    """Makes an instruction recognisable in the model server's records."""
    return f"{text} [{uuid.uuid4().hex[:10]}]"


# ------------------------------------------------------------------ streaming


async def streaming_example(addr: str, instruction: str) -> list[agent_pb2.TaskStream]:
    seen: list[agent_pb2.TaskStream] = []
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        # (optional) configure the grounding / action models
        await stub.SetGlobalGroundingLLMConfig(
            agent_pb2.SetGlobalGroundingLLMConfigRequest(
                llmConfig=agent_pb2.LLMConfig(modelName=GROUNDING_MODEL)
            )
        )
        await stub.SetGlobalCommonLLMConfig(
            agent_pb2.SetGlobalCommonLLMConfigRequest(
                llmConfig=agent_pb2.LLMConfig(modelName=ACTION_MODEL)
            )
        )
        async for ev in stub.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction=instruction)
        ):
            # seed: the example prints ev.taskStream.stage, but RunAgentInstruction
            # returns `stream TaskStream` (not GetAgentTaskStreamResponse), so the
            # fields are on ev itself; ev.taskStream would raise AttributeError.
            print(f"[STREAM {ev.stage}] {ev.message}")
            seen.append(ev)
    return seen


def test_streaming_example(env: SimpleNamespace) -> None:
    instruction = unique("Open a calculator and compute 1 + 1")
    seen = asyncio.run(streaming_example(env.addr, instruction))
    stages = [ev.stage for ev in seen]
    assert seen, "RunAgentInstruction streamed nothing"
    assert stages[-1] == "final", stages
    assert seen[-1].message == ANSWER
    assert "content" in stages and "thought" in stages, stages
    content = "".join(ev.message for ev in seen if ev.stage == "content")
    assert content == ANSWER
    thought = "".join(ev.message for ev in seen if ev.stage == "thought")
    assert thought == REASONING
    task_ids = {ev.taskId for ev in seen}
    assert len(task_ids) == 1 and "" not in task_ids, task_ids
    assert all(ev.HasField("timestamp") and ev.timestamp.seconds > 0 for ev in seen)
    # Timestamps never go backwards.
    times = [ev.timestamp.ToDatetime() for ev in seen]
    assert times == sorted(times)
    # The global action model set by the example is the one the model server was asked for.
    recs = env.llm.streams(instruction)
    assert [r["model"] for r in recs] == [ACTION_MODEL], recs
    status = wait_status(env.d.agent, task_ids.pop())
    assert status.status == agent_pb2.SUCCESS
    assert status.result == ANSWER


# ------------------------------------------------------------------ async lifecycle


async def lifecycle_example(addr: str, instruction: str) -> SimpleNamespace:
    out = SimpleNamespace(stream=[], polls=[], final=None)
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        # start the task
        start = await stub.RunAgentInstructionAsync(
            agent_pb2.RunAgentInstructionRequest(instruction=instruction)
        )
        task_id = start.taskId
        print("Started task", task_id)
        out.task_id = task_id

        # stream and poll concurrently
        async def stream_events() -> None:
            async for ev in stub.GetAgentTaskStream(
                agent_pb2.GetAgentTaskStreamRequest(taskId=task_id)
            ):
                print(f"[STREAM {ev.taskStream.stage}] {ev.taskStream.message}")
                out.stream.append((time.monotonic(), ev.taskStream))

        async def poll_status() -> None:
            while True:
                status = await stub.QueryTaskStatus(
                    agent_pb2.QueryTaskStatusRequest(taskId=task_id)
                )
                print("[STATUS]", agent_pb2.TaskStatus.Name(status.status))
                out.polls.append((time.monotonic(), status.status))
                if status.status in (agent_pb2.SUCCESS, agent_pb2.FAILURE, agent_pb2.CANCELLED):
                    print("Final result:", status.result)
                    if status.executionStatistics:
                        print(
                            "Steps:",
                            status.executionStatistics.steps,
                            "Duration(s):",
                            status.executionStatistics.durationSeconds,
                            "Tokens:",
                            status.executionStatistics.totalTokens,
                        )
                    out.final = status
                    break
                # seed: sleeps 4 s; a short poll keeps the test fast and still
                # overlaps the stream.
                await asyncio.sleep(0.05)

        await asyncio.wait_for(asyncio.gather(stream_events(), poll_status()), timeout=30)
    return out


def test_async_lifecycle_stream_and_poll_together(env: SimpleNamespace) -> None:
    instruction = unique("Create a new text document and write today's date")
    t0 = time.monotonic()
    out = asyncio.run(lifecycle_example(env.addr, instruction))
    assert out.task_id
    final = out.final
    assert final is not None
    assert final.status == agent_pb2.SUCCESS, final
    assert final.taskId == out.task_id
    assert final.result == ANSWER

    stats = final.executionStatistics
    assert final.HasField("executionStatistics")
    assert stats.steps >= 1, stats
    assert stats.inputTokens > 0 and stats.outputTokens > 0, stats
    assert stats.totalTokens == stats.inputTokens + stats.outputTokens, stats
    assert 0 <= stats.durationSeconds <= time.monotonic() - t0 + 1, stats

    stages = [ts.stage for _, ts in out.stream]
    assert stages and stages[-1] == "final", stages
    assert out.stream[-1][1].message == ANSWER
    assert "".join(ts.message for _, ts in out.stream if ts.stage == "content") == ANSWER
    assert all(ts.taskId == out.task_id for _, ts in out.stream)

    # Poll and stream really ran together: a poll saw the task not yet finished
    # while content was streaming.
    statuses = [s for _, s in out.polls]
    assert statuses[-1] == agent_pb2.SUCCESS
    assert agent_pb2.RUNNING in statuses, [agent_pb2.TaskStatus.Name(s) for s in statuses]
    running_polls = [t for t, s in out.polls if s == agent_pb2.RUNNING]
    content_times = [t for t, ts in out.stream if ts.stage == "content"]
    assert min(content_times) < max(running_polls), "no RUNNING poll after content began"
    # Once terminal, it stays terminal.
    first_done = statuses.index(agent_pb2.SUCCESS)
    assert all(s == agent_pb2.SUCCESS for s in statuses[first_done:])


def test_late_subscriber_gets_history_and_end(env: SimpleNamespace) -> None:
    """GetAgentTaskStream on a finished task replays it and ends (the seed's hangs)."""
    out = asyncio.run(lifecycle_example(env.addr, unique("Write the date again")))
    assert out.final.status == agent_pb2.SUCCESS

    async def replay() -> list[agent_pb2.TaskStream]:
        async with grpc.aio.insecure_channel(env.addr) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            req = agent_pb2.GetAgentTaskStreamRequest(taskId=out.task_id)
            return [ev.taskStream async for ev in stub.GetAgentTaskStream(req, timeout=10)]

    late = asyncio.run(replay())
    live = [ts for _, ts in out.stream]
    assert [(t.stage, t.message) for t in late] == [(t.stage, t.message) for t in live]


# ------------------------------------------------------------------ cancel


async def cancel_example(addr: str, task_id: str) -> agent_pb2.CancelTaskResponse:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        cancel_resp = await stub.CancelTask(agent_pb2.CancelTaskRequest(taskId=task_id))
        print("Cancel success?", cancel_resp.success, cancel_resp.message)
        return cancel_resp


def test_cancel_running_then_finished(env: SimpleNamespace) -> None:
    agent = env.d.agent
    # A long generation (500 tokens at 50/s) on the slow model server.
    instruction = unique("Write a long essay")
    start = agent.RunAgentInstructionAsync(
        agent_pb2.RunAgentInstructionRequest(
            instruction=instruction, runningConfig=env.slow.model_config()
        ),
        timeout=5,
    )
    task_id = start.taskId
    # Cancel once it is really generating: the model server has a stream open.
    env.slow.wait_streams(
        instruction, lambda r: any(x["tokens"] > 0 for x in r), 15, "tokens streamed"
    )
    assert wait_status(agent, task_id, [agent_pb2.RUNNING]).status == agent_pb2.RUNNING

    resp = asyncio.run(cancel_example(env.addr, task_id))
    assert resp.success is True, resp
    assert resp.taskId == task_id
    status = wait_status(agent, task_id, timeout=5)
    assert status.status == agent_pb2.CANCELLED, status

    # Cancelling it again changes nothing, and says so.
    again = asyncio.run(cancel_example(env.addr, task_id))
    assert again.success is False, again
    assert wait_status(agent, task_id, timeout=1).status == agent_pb2.CANCELLED

    # A task that finished by itself cannot be cancelled.
    done = agent.RunAgentInstructionAsync(
        agent_pb2.RunAgentInstructionRequest(instruction=unique("quick one")), timeout=5
    )
    assert wait_status(agent, done.taskId).status == agent_pb2.SUCCESS
    resp = asyncio.run(cancel_example(env.addr, done.taskId))
    assert resp.success is False, resp
    assert wait_status(agent, done.taskId, timeout=1).status == agent_pb2.SUCCESS

    # An unknown task cannot be cancelled either.
    resp = asyncio.run(cancel_example(env.addr, "no-such-task-" + uuid.uuid4().hex))
    assert resp.success is False, resp


# ------------------------------------------------------------------ config updates


async def config_example(addr: str) -> agent_pb2.SetCommonConfigResponse:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        # update only the grounding model
        await stub.SetGlobalGroundingLLMConfig(
            agent_pb2.SetGlobalGroundingLLMConfigRequest(
                llmConfig=agent_pb2.LLMConfig(modelName=GROUNDING_MODEL)
            )
        )
        # update the action generator
        await stub.SetGlobalCommonLLMConfig(
            agent_pb2.SetGlobalCommonLLMConfigRequest(
                llmConfig=agent_pb2.LLMConfig(modelName=ACTION_MODEL)
            )
        )
        # set the full global config (mode FAST, at most 40 steps)
        return await stub.SetGlobalCommonConfig(
            agent_pb2.SetGlobalCommonConfigRequest(
                commonConfig=agent_pb2.CommonConfig(
                    id="global",
                    backend="lybic",
                    mode=agent_pb2.FAST,
                    steps=40,
                    authorizationInfo=agent_pb2.Authorization(orgID="org_123", apiKey="sk_live"),
                    stageModelConfig=agent_pb2.StageModelConfig(
                        groundingModel=agent_pb2.LLMConfig(modelName=GROUNDING_MODEL),
                        actionGeneratorModel=agent_pb2.LLMConfig(modelName=ACTION_MODEL),
                    ),
                )
            )
        )


def test_config_updates_masked_and_per_task_override(env: SimpleNamespace) -> None:
    agent = env.d.agent
    resp = asyncio.run(config_example(env.addr))
    assert resp.success is True, resp

    cfg = agent.GetGlobalCommonConfig(agent_pb2.GetGlobalCommonConfigRequest(), timeout=5)
    assert cfg.backend == "lybic"
    assert cfg.mode == agent_pb2.FAST
    assert cfg.steps == 40
    assert cfg.authorizationInfo.orgID == "org_123"
    key = cfg.authorizationInfo.apiKey
    assert key != "sk_live" and "sk_" not in key, f"apiKey read back unmasked: {key!r}"
    assert key.startswith("*"), f"apiKey not masked as documented (****xxxx): {key!r}"
    assert cfg.stageModelConfig.groundingModel.modelName == GROUNDING_MODEL
    assert cfg.stageModelConfig.actionGeneratorModel.modelName == ACTION_MODEL

    # An LLM apiKey is masked too (`sk-…abcd` → `****abcd`).
    agent.SetGlobalEmbeddingLLMConfig(
        agent_pb2.SetGlobalEmbeddingLLMConfigRequest(
            llmConfig=agent_pb2.LLMConfig(modelName="embed-x", apiKey="sk-embedsecret9876")
        ),
        timeout=5,
    )
    cfg = agent.GetGlobalCommonConfig(agent_pb2.GetGlobalCommonConfigRequest(), timeout=5)
    embed_key = cfg.stageModelConfig.embeddingModel.apiKey
    assert cfg.stageModelConfig.embeddingModel.modelName == "embed-x"
    assert "embedsecret" not in embed_key and embed_key.endswith("9876"), embed_key
    # Setting the embedding model did not wipe the others.
    assert cfg.stageModelConfig.actionGeneratorModel.modelName == ACTION_MODEL
    assert cfg.authorizationInfo.orgID == "org_123"

    # A per-task runningConfig overrides the model for that task only.
    override = unique("Use the override model")
    running = agent_pb2.CommonConfig(
        stageModelConfig=agent_pb2.StageModelConfig(
            actionGeneratorModel=agent_pb2.LLMConfig(
                modelName="override-model-7", apiEndpoint=env.llm.base_url
            )
        )
    )
    stream = list(
        agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction=override, runningConfig=running),
            timeout=30,
        )
    )
    assert stream and stream[-1].stage == "final", [s.stage for s in stream]
    after = unique("Use the global model")
    stream = list(
        agent.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction=after), timeout=30
        )
    )
    assert stream and stream[-1].stage == "final", [s.stage for s in stream]
    assert [r["model"] for r in env.llm.streams(override)] == ["override-model-7"]
    assert [r["model"] for r in env.llm.streams(after)] == [ACTION_MODEL]
    cfg = agent.GetGlobalCommonConfig(agent_pb2.GetGlobalCommonConfigRequest(), timeout=5)
    assert cfg.stageModelConfig.actionGeneratorModel.modelName == ACTION_MODEL


# ------------------------------------------------------------------ one-shot helper


async def run_one_shot(addr: str, instruction: str) -> list[str]:
    results = []
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        async for ev in stub.RunAgentInstruction(
            agent_pb2.RunAgentInstructionRequest(instruction=instruction)
        ):
            # seed: `ev.taskStream.stage` — see streaming_example.
            if ev.stage == "final":
                print("Result:", ev.message)
                results.append(ev.message)
    return results


def test_one_shot_helper(env: SimpleNamespace) -> None:
    assert asyncio.run(run_one_shot(env.addr, unique("compute 1 + 1"))) == [ANSWER]
