"""byclaw-gateway-sdk 0.1.1's Redis Streams format, as plain data (no I/O).

Read from the SDK's source (``common/constants.py``, ``core/protocol/*``,
``common/emitter.py``, ``worker/runner.py``); nothing here imports the SDK,
which needs Python 3.12 and runs in its own venv (``.venv-byclaw``).

Commands (``XADD <stream> * data <json>``):

* tasks go to ``byai_gateway:ctrl:capability:<capability>``, read by the
  workers' consumer group (``run_worker``'s ``consumer_group``, default
  ``agent_engines``) with ``XREADGROUP ... >``; JSON ``{"action_type":
  "ASK_AGENT", "header": {...}, "body": {"content", "wait_for_reply", "extra_payload"}}``;
* a cancel goes to the worker that took the task,
  ``byai_gateway:ctrl:worker:<worker_id>``: ``{"action_type": "CANCEL_TASK",
  "header": {...}, "body": {"target_message_id", "target_execution_id", "reason", ...}}``;
  the worker sets the task's cancel event and ``asyncio.Task.cancel()``\\ s it.

Output: ``emit_chunk`` / ``emit_state`` / ``emit_artifact`` each ``XADD`` a
``DataMessage`` (``data`` = JSON ``{trace_id, session_id, event_type,
source_agent_id, message_id, timestamp, data, state_msg, artifact_url,
metadata}``) to ``byai_gateway:session:<session_id>:data_stream``; ``data``
is an OpenAI-like chunk whose ``contentType`` tells the kind and whose
``choices[0].delta.content`` holds the text (chunk ``1002``), the state
(``3003``) or a JSON list of ``{"fileUrl"}`` (artifact, ``3010``). The SDK
itself emits the lifecycle states ``COMPLETED``, ``FAILED: <error>``,
``CANCELLING`` and ``CANCELLED`` as states.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

#: The consumer group ``run_worker`` gives its workers unless told otherwise.
DEFAULT_WORKER_GROUP = "agent_engines"
#: Our consumer group on the session data streams (acks what we relayed).
BRIDGE_GROUP = "agentdispatch_bridge"

ACTIVE_WORKERS = "byai_gateway:registry:active_workers"
#: The SDK's TTL of session keys (``RedisKeys.DEFAULT_SESSION_TTL``).
SESSION_TTL = 7 * 24 * 3600

# contentType values (byclaw_gateway_sdk.core.protocol.content_type)
CT_TEXT = "1002"
CT_THINK_TITLE = "3003"
CT_THINK_SUB_TITLE = "3005"
CT_CREATE_FILE = "3010"
CT_USER_INPUT = "3013"

EV_ANSWER_DELTA = "answerDelta"
EV_APP_STREAM_RESPONSE = "appStreamResponse"
EV_REASONING_DELTA = "reasoningLogDelta"

#: Lifecycle states the SDK emits itself (worker.py ``_handle_message``).
STATE_COMPLETED = "COMPLETED"
STATE_FAILED = "FAILED"
STATE_CANCELLING = "CANCELLING"
STATE_CANCELLED = "CANCELLED"

#: action_type values the SDK's command registry knows.
KNOWN_ACTIONS = frozenset({"ASK_AGENT", "RESUME", "CANCEL_TASK"})


def ctrl_stream(capability: str) -> str:
    return f"byai_gateway:ctrl:capability:{capability}"


def worker_ctrl_stream(worker_id: str) -> str:
    return f"byai_gateway:ctrl:worker:{worker_id}"


def session_data_stream(session_id: str) -> str:
    return f"byai_gateway:session:{session_id}:data_stream"


def session_registry(session_id: str) -> str:
    return f"byai_gateway:session:{session_id}:registry"


def worker_capabilities(worker_id: str) -> str:
    return f"byai_gateway:registry:worker:capabilities:{worker_id}"


def worker_lock(worker_id: str) -> str:
    return f"byai_gateway:registry:worker:lock:{worker_id}"


def _header(
    message_id: str, session_id: str, trace_id: str, target: str, **extra: Any
) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "session_id": session_id,
        "trace_id": trace_id,
        "source_agent_id": "",
        "target_agent_type": target,
        "parent_message_id": extra.get("parent_message_id", ""),
        "task_group_id": "",
        "tenant_id": extra.get("tenant_id", ""),
        "metadata": extra.get("metadata", {}),
    }


def ask_agent_payload(
    *,
    capability: str,
    message_id: str,
    session_id: str,
    content: str,
    extra_payload: dict[str, Any],
    trace_id: str | None = None,
    tenant_id: str = "",
) -> dict[str, str]:
    """The stream entry of an ``AskAgentCommand`` (what ``GatewayClient.send_message`` writes)."""
    if not content.strip():
        raise ValueError("an AskAgentCommand needs non-empty content")
    command = {
        "action_type": "ASK_AGENT",
        "header": _header(
            message_id,
            session_id,
            trace_id or uuid.uuid4().hex,
            capability,
            tenant_id=tenant_id,
            metadata={"source": "agentdispatch"},
        ),
        "body": {"content": content, "wait_for_reply": False, "extra_payload": extra_payload},
    }
    return {"data": json.dumps(command, ensure_ascii=False)}


def cancel_task_payload(
    *,
    message_id: str,
    session_id: str,
    capability: str,
    worker_id: str,
    execution_id: str = "",
    reason: str = "",
) -> dict[str, str]:
    """The stream entry of a ``CancelTaskCommand`` (what ``GatewayClient.cancel_task`` writes)."""
    command = {
        "action_type": "CANCEL_TASK",
        "header": _header(
            f"msg-cancel-{uuid.uuid4().hex[:8]}",
            session_id,
            uuid.uuid4().hex,
            capability,
            parent_message_id=message_id,
        ),
        "body": {
            "target_message_id": message_id,
            "target_execution_id": execution_id,
            "target_worker_id": worker_id,
            "reason": reason,
            "requested_by": "agentdispatch",
            "cancel_mode": "graceful",
        },
    }
    return {"data": json.dumps(command, ensure_ascii=False)}


def probe_payload(worker_id: str) -> dict[str, str]:
    """A no-op ``CancelTaskCommand`` (its target exists nowhere): the worker's
    control loop acks it without side effects, which proves that loop runs."""
    probe = f"agentdispatch-probe-{uuid.uuid4().hex[:12]}"
    return cancel_task_payload(
        message_id=probe,
        session_id=probe,
        capability="",
        worker_id=worker_id,
        reason="agentdispatch liveness probe (no such task)",
    )


class MalformedEntryError(ValueError):
    """A stream entry that is not what the SDK writes."""


def _has_content(value: object) -> bool:
    """The SDK's ``_has_content``: a non-blank string, a non-empty list, or any other value."""
    if isinstance(value, str):
        return value.strip() != ""
    if isinstance(value, list):
        return len(value) > 0
    return value is not None


def command_problem(fields: dict[str, str]) -> str | None:
    """Why the SDK's worker would fail to parse this control entry, or None if it parses.

    Mirrors ``parse_message_data`` + ``command_from_dict`` and the commands'
    ``__post_init__`` checks: a missing ``data`` field, bad JSON, an unknown
    ``action_type``, a header without ``message_id`` / ``session_id`` /
    ``trace_id``, an ``ASK_AGENT`` without content, a ``RESUME`` without status
    or content, a ``CANCEL_TASK`` without target or with an unknown mode. Such
    entries the worker logs and leaves pending for ever.
    """
    raw = fields.get("data")
    if raw is None:
        return "no 'data' field"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return f"data is not JSON: {exc}"
    if not isinstance(data, dict):
        return "data is not a JSON object"
    action = data.get("action_type")
    if action not in KNOWN_ACTIONS:
        return f"unknown action_type {action!r}"
    header = data.get("header")
    if not isinstance(header, dict) or not all(
        k in header for k in ("message_id", "session_id", "trace_id")
    ):
        return "header lacks message_id/session_id/trace_id"
    body = data.get("body", {})
    if not isinstance(body, dict):
        return "body is not an object"
    if action == "ASK_AGENT" and not _has_content(body.get("content", "")):
        return "ASK_AGENT without content"
    if action == "RESUME" and not body.get("status") and not _has_content(body.get("content", "")):
        return "RESUME without status or content"
    if action == "CANCEL_TASK":
        if not body.get("target_message_id"):
            return "CANCEL_TASK without target_message_id"
        if body.get("cancel_mode", "graceful") not in ("graceful", "force"):
            return "CANCEL_TASK with an unknown cancel_mode"
    return None


@dataclass(frozen=True)
class DataEvent:
    """One decoded entry of a session data stream."""

    #: ``chunk``, ``reasoning``, ``state``, ``artifact`` or ``other``.
    kind: str
    message_id: str
    event_type: str
    content_type: str
    #: The text, the state, or the JSON of the artifact list.
    content: str
    #: Artifact URLs (kind ``artifact``).
    urls: tuple[str, ...] = field(default=())
    source_agent_id: str = ""


def parse_data_entry(fields: dict[str, str]) -> DataEvent:
    """Decodes a ``DataMessage`` entry; :class:`MalformedEntryError` if it is not one."""
    raw = fields.get("data")
    if raw is None:
        raise MalformedEntryError("no 'data' field")
    try:
        msg = json.loads(raw)
    except ValueError as exc:
        raise MalformedEntryError(f"data is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise MalformedEntryError("data is not a JSON object")
    event_type = msg.get("event_type")
    message_id = msg.get("message_id")
    payload = msg.get("data")
    if not isinstance(event_type, str) or not isinstance(message_id, str):
        raise MalformedEntryError("event_type or message_id missing")
    if not isinstance(payload, dict):
        raise MalformedEntryError("data.data is not an object")
    content_type = payload.get("contentType")
    choices = payload.get("choices")
    if not isinstance(content_type, str) or not isinstance(choices, list) or not choices:
        raise MalformedEntryError("no contentType or choices")
    first = choices[0]
    delta = first.get("delta") if isinstance(first, dict) else None
    if not isinstance(delta, dict):
        raise MalformedEntryError("choices[0].delta is not an object")
    content = delta.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise MalformedEntryError("delta.content is not a string")
    source = msg.get("source_agent_id")
    source = source if isinstance(source, str) else ""
    urls: tuple[str, ...] = ()
    if content_type == CT_CREATE_FILE:
        kind = "artifact"
        try:
            files = json.loads(content) if content else []
        except ValueError:
            raise MalformedEntryError("artifact content is not JSON") from None
        if not isinstance(files, list):
            raise MalformedEntryError("artifact content is not a list")
        urls = tuple(str(f["fileUrl"]) for f in files if isinstance(f, dict) and f.get("fileUrl"))
    elif content_type in (CT_THINK_TITLE, CT_THINK_SUB_TITLE):
        kind = "state"
    elif content_type == CT_TEXT and event_type in (EV_ANSWER_DELTA, EV_APP_STREAM_RESPONSE):
        kind = "chunk"
    elif content_type == CT_TEXT:
        kind = "reasoning"
    else:
        kind = "other"
    return DataEvent(
        kind=kind,
        message_id=message_id,
        event_type=event_type,
        content_type=content_type,
        content=content,
        urls=urls,
        source_agent_id=source,
    )


def stream_id(entry_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a comparable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
