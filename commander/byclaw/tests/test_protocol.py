"""The byclaw wire format (commander.byclaw._protocol), without Redis.

The data entries are shaped exactly as byclaw-gateway-sdk 0.1.1's
GatewayDataEmitter writes them (captured from a real worker); the e2e tests
(tests/test_byclaw.py) run the real SDK.
"""

from __future__ import annotations

import json

import pytest

from commander.byclaw import _protocol as proto


def emitted(
    content: str | None, content_type: str, event_type: str = "answerDelta"
) -> dict[str, str]:
    """A DataMessage entry as the SDK's emitter writes it."""
    msg = {
        "trace_id": "t1",
        "session_id": "s1",
        "event_type": event_type,
        "source_agent_id": "weather_agent",
        "message_id": "m1",
        "timestamp": 1796514891260,
        "data": {
            "id": "50302DF74D3546D5BC1B4E4E2F35E6C0",
            "created": 1796514891,
            "model": "",
            "object": "",
            "contentType": content_type,
            "agentId": "weather_agent",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "",
                    "delta": {
                        "role": "assistant",
                        "content": content,
                        "function_call": None,
                        "tool_calls": None,
                    },
                }
            ],
        },
        "state_msg": "",
        "artifact_url": "",
        "metadata": {},
    }
    return {"data": json.dumps(msg)}


def test_chunk_state_artifact_reasoning() -> None:
    ev = proto.parse_data_entry(emitted("正在处理您的请求...\n", "1002"))
    assert (ev.kind, ev.content, ev.message_id) == ("chunk", "正在处理您的请求...\n", "m1")
    ev = proto.parse_data_entry(emitted("thinking", "3003", "reasoningLogDelta"))
    assert (ev.kind, ev.content) == ("state", "thinking")
    files = json.dumps([{"fileUrl": "https://x/a.png"}, {"fileUrl": "https://x/b.txt"}])
    ev = proto.parse_data_entry(emitted(files, "3010", "reasoningLogDelta"))
    assert ev.kind == "artifact" and ev.urls == ("https://x/a.png", "https://x/b.txt")
    ev = proto.parse_data_entry(emitted("step", "1002", "reasoningLogDelta"))
    assert ev.kind == "reasoning"
    ev = proto.parse_data_entry(emitted("{}", "3013", "reasoningLogDelta"))
    assert ev.kind == "other"
    assert proto.parse_data_entry(emitted(None, "1002")).content == ""


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"data": "{not json"},
        {"data": "[1, 2]"},
        {"data": json.dumps({"event_type": "answerDelta"})},
        {"data": json.dumps({"event_type": "answerDelta", "message_id": "m", "data": {}})},
        {
            "data": json.dumps(
                {
                    "event_type": "answerDelta",
                    "message_id": "m",
                    "data": {"contentType": "1002", "choices": [{"delta": {"content": 5}}]},
                }
            )
        },
        emitted("not a list", "3010", "reasoningLogDelta"),
    ],
)
def test_malformed_data_entries(fields: dict[str, str]) -> None:
    with pytest.raises(proto.MalformedEntryError):
        proto.parse_data_entry(fields)


def test_ask_agent_payload_is_what_the_worker_parses() -> None:
    entry = proto.ask_agent_payload(
        capability="weather_agent",
        message_id="msg-1",
        session_id="agentdispatch-1",
        content="今天北京天气怎么样?",
        extra_payload={"input": "x"},
    )
    assert proto.command_problem(entry) is None
    data = json.loads(entry["data"])
    assert data["action_type"] == "ASK_AGENT"
    assert data["header"]["target_agent_type"] == "weather_agent"
    assert data["body"]["content"] == "今天北京天气怎么样?"
    with pytest.raises(ValueError, match="non-empty"):
        proto.ask_agent_payload(
            capability="c", message_id="m", session_id="s", content="  ", extra_payload={}
        )


def test_cancel_and_probe_payloads() -> None:
    entry = proto.cancel_task_payload(
        message_id="msg-1", session_id="s", capability="c", worker_id="w", reason="stop"
    )
    assert proto.command_problem(entry) is None
    body = json.loads(entry["data"])["body"]
    assert (body["target_message_id"], body["target_worker_id"]) == ("msg-1", "w")
    probe = json.loads(proto.probe_payload("w")["data"])
    assert probe["action_type"] == "CANCEL_TASK"
    assert probe["body"]["target_message_id"].startswith("agentdispatch-probe-")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"nodata": "x"}, "no 'data' field"),
        ({"data": "{x"}, "not JSON"),
        ({"data": json.dumps({"action_type": "NOPE"})}, "unknown action_type"),
        ({"data": json.dumps({"action_type": "ASK_AGENT", "header": {}})}, "header lacks"),
        (
            {
                "data": json.dumps(
                    {
                        "action_type": "ASK_AGENT",
                        "header": {"message_id": "m", "session_id": "s", "trace_id": "t"},
                        "body": {"content": ""},
                    }
                )
            },
            "without content",
        ),
    ],
)
def test_command_problem(fields: dict[str, str], problem: str) -> None:
    found = proto.command_problem(fields)
    assert found is not None and problem in found


def test_stream_ids_order_numerically() -> None:
    assert proto.stream_id("1796514891245-10") > proto.stream_id("1796514891245-9")
    assert proto.stream_id("99-0") < proto.stream_id("100-0")
    assert proto.stream_id("5") == (5, 0)
