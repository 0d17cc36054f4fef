"""Client of the scriptedllm test double (dispatcher_go/cmd/scriptedllm).

The server replays a script file: a request gets entry k when its conversation
already holds k assistant messages (past the end: generated filler text). It
records every request (model, last user message, outcome: completed or
client_closed, end time) and serves them at GET /stats.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from commander._gen.lybic.agent import agent_pb2
from tests._procs import Proc, Timeout


class ScriptedLLM:
    """A running scriptedllm process."""

    def __init__(self, proc: Proc, addr: str):
        self.proc = proc
        self.addr = addr
        self.base_url = f"http://{addr}/v1"

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.addr}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def ready(self) -> bool:
        return "streams" in self._get("/stats")

    def stats(self) -> dict[str, Any]:
        return self._get("/stats")  # type: ignore[no-any-return]

    def streams(self, marker: str | None = None) -> list[dict[str, Any]]:
        """Recorded requests, optionally only those whose last user message holds marker."""
        recs = self.stats().get("streams") or []
        if marker is None:
            return recs
        return [r for r in recs if marker in (r.get("last_user") or "")]

    def wait_streams(
        self,
        marker: str,
        pred: Callable[[list[dict[str, Any]]], bool],
        timeout: float,
        what: str,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.streams(marker)
            if pred(recs):
                return recs
            if time.monotonic() >= deadline:
                raise Timeout(f"scriptedllm: {what} not seen within {timeout}s; records: {recs}")
            time.sleep(0.02)

    def model_config(self, model: str = "scripted") -> agent_pb2.CommonConfig:
        """A runningConfig that sends one task's model calls to this server."""
        return agent_pb2.CommonConfig(
            stageModelConfig=agent_pb2.StageModelConfig(
                actionGeneratorModel=agent_pb2.LLMConfig(modelName=model, apiEndpoint=self.base_url)
            )
        )


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One scripted function call. The commander shows the model dotted tool names
    with `.` replaced by `__` (OpenAI function names allow no dots)."""
    return {"name": name.replace(".", "__"), "arguments": arguments}
