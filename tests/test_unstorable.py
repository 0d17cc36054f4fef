"""A value that cannot be stored must not poison a task (issue 12, class 1), across
real processes: the dispatcher binary on its SQLite store, the commander, the
workspace tool provider and the scripted model.

A tool error longer than the dispatcher's 512-byte bound, in Chinese, used to be
cut in the middle of a character: protobuf refused to send the result, the
commander's stream was torn down and the task ended FAILURE ("commander
connection lost"), and the event stored could not be read back, so the task's
history was lost for good.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from commander._gen.dispatch.v1 import interaction_pb2, tasks_pb2
from commander._gen.lybic.agent import agent_pb2
from tests._client import describe, kind, wait_status, watch_all
from tests.conftest import Stack
from tests.scripted import tool_call

pytestmark = pytest.mark.e2e

#: A path of short Chinese folder names (each under NAME_MAX), about 1 KB in
#: all; "xy/" puts the 512-byte cut of its error message inside a character.
LONG_PATH = "xy/" + "中文文件夹/" * 60 + "说明.txt"
DONE = "The file is not there; finished anyway."


def test_long_chinese_tool_error_through_the_real_provider(stack: Stack, tmp_path: Path) -> None:
    llm = stack.scripted(
        [{"tool_calls": [tool_call("workspace.read_file", {"path": LONG_PATH})]}, {"content": DONE}]
    )
    d = stack.dispatcher()  # on its own SQLite store (--data-dir)
    stack.provider(d, tmp_path / "workspace")
    stack.commander(d, llm.base_url, slots=1, wait_slots=1)
    task_id = d.tasks.SubmitTask(
        tasks_pb2.SubmitTaskRequest(
            instruction="read the Chinese file", running_config=llm.model_config()
        ),
        timeout=5,
    ).task_id

    status = wait_status(d.agent, task_id)
    events = watch_all(d.tasks, task_id)
    assert status.status == agent_pb2.SUCCESS, (status, describe(events))
    assert status.result == DONE
    [result] = [e.tool_result.result for e in events if kind(e) == "tool_result"]
    assert result.error.code == interaction_pb2.TOOL_ERROR_CODE_EXECUTION_FAILED, result
    # The provider's message (workspace: "no such file: '<path>'"), cut by the
    # dispatcher on a character boundary and marked.
    full = f"no such file: {LONG_PATH!r}"
    assert len(full.encode()) > 600
    message = result.error.message
    assert message.endswith("…") and full.startswith(message.removesuffix("…")), message
    assert 500 < len(message.encode()) <= 512 + len("…".encode()), message

    # Read back from the store after a crash (kill -9): the whole history.
    d2 = stack.restart_dispatcher(d)
    stored = watch_all(d2.tasks, task_id)
    assert [(e.seq, kind(e)) for e in stored] == [(e.seq, kind(e)) for e in events]
    [again] = [e.tool_result.result for e in stored if kind(e) == "tool_result"]
    assert again.error.message == message
