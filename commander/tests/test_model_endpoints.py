"""Credentials never follow a client-chosen endpoint (issue 12, class 2).

The operator's key goes only to the operator's endpoint; a task may name
another endpoint only if it is on the allowlist, never a link-local or cloud
metadata address, and what such an endpoint gets is the task's own key or
none. Every refusal ends the task FAILURE with the reason, before any request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from commander import Commander, LLMSettings, _llm
from commander._chat import resolve_model
from commander._errors import EndpointNotAllowedError
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.lybic.agent import agent_pb2
from commander._llm import ModelTarget, check_endpoint, model_error, parse_allowed_endpoints
from commander.tests.fakes import DispatcherServer, Reply, ScriptedLLM

pytestmark = pytest.mark.anyio

OPERATOR_KEY = "sk-operator-secret-123456"


def naming(endpoint: str, *, key: str | None = None, model: str = "task-model") -> Any:
    llm = agent_pb2.LLMConfig(modelName=model, apiEndpoint=endpoint)
    if key is not None:
        llm.apiKey = key
    return agent_pb2.CommonConfig(
        stageModelConfig=agent_pb2.StageModelConfig(actionGeneratorModel=llm)
    )


def operator_settings(llm: ScriptedLLM, allowed: Sequence[str] = ()) -> LLMSettings:
    return LLMSettings(
        base_url=llm.base_url,
        model="operator-model",
        api_key=OPERATOR_KEY,
        allowed_endpoints=tuple(allowed),
    )


async def run_one(
    dispatcher: DispatcherServer,
    make_commander: Callable[..., Commander],
    settings: LLMSettings,
    config: Any = None,
) -> list[ipb.UpstreamPacket]:
    async with make_commander(llm=settings):
        slot = await dispatcher.servicer.next_slot()
        if config is None:
            await slot.start("hi")
        else:
            await slot.start("hi", config=config)
        return await slot.recv_until_terminal()


def assert_refused(packets: list[ipb.UpstreamPacket], *, because: str) -> str:
    kinds = [p.WhichOneof("payload") for p in packets]
    assert kinds == ["error", "result"], kinds
    error, result = packets[0].error, packets[1].result
    assert error.code == "model_endpoint_not_allowed"
    assert error.message.startswith("model endpoint not allowed: "), error.message
    assert because in error.message, error.message
    assert result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert result.message == error.message
    assert OPERATOR_KEY not in error.message
    return error.message


async def test_a_task_naming_another_endpoint_without_a_key_is_refused_before_any_request(
    dispatcher: DispatcherServer,
    llm: ScriptedLLM,
    other: ScriptedLLM,
    make_commander: Callable[..., Commander],
) -> None:
    packets = await run_one(
        dispatcher, make_commander, operator_settings(llm), naming(other.base_url)
    )
    message = assert_refused(packets, because="allowlist")
    assert other.base_url in message
    assert other.streams == [] and llm.streams == []  # no request anywhere


async def test_an_allowlisted_endpoint_gets_the_tasks_key_or_none_never_the_operators(
    dispatcher: DispatcherServer,
    llm: ScriptedLLM,
    other: ScriptedLLM,
    make_commander: Callable[..., Commander],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ambient OpenAI settings of the commander's process are the operator's too.
    monkeypatch.setenv("OPENAI_ORG_ID", "org-operator")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-operator")
    other.replies += [Reply.text("no key"), Reply.text("own key")]
    llm.replies.append(Reply.text("default"))
    settings = operator_settings(llm, allowed=[other.base_url])
    async with make_commander(llm=settings):
        slot = await dispatcher.servicer.next_slot()
        await slot.start("hi", config=naming(other.base_url))
        keyless = await slot.recv_until_terminal()
        await slot.start("hi", config=naming(other.base_url + "/", key="sk-task-own-key"))
        keyed = await slot.recv_until_terminal()
        await slot.start("hi")  # the README path: no endpoint → the operator's, with its key
        default = await slot.recv_until_terminal()
    for packets in (keyless, keyed, default):
        assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS, packets[-1]
    first, second = other.streams
    assert "authorization" not in first.headers, first.headers
    assert second.headers["authorization"] == "Bearer sk-task-own-key"
    for record in (first, second):
        assert OPERATOR_KEY not in json.dumps(record.headers)
        assert "openai-organization" not in record.headers
        assert "openai-project" not in record.headers
    (operator,) = llm.streams
    assert operator.headers["authorization"] == f"Bearer {OPERATOR_KEY}"
    assert operator.request["model"] == "operator-model"


async def test_a_task_naming_the_operators_endpoint_gets_the_operators_key(
    dispatcher: DispatcherServer,
    llm: ScriptedLLM,
    make_commander: Callable[..., Commander],
) -> None:
    llm.replies.append(Reply.text("ok"))
    # Spelt differently: upper-case host, explicit trailing slash.
    endpoint = llm.base_url.replace("127.0.0.1", "127.0.0.1".upper()) + "/"
    packets = await run_one(dispatcher, make_commander, operator_settings(llm), naming(endpoint))
    assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_SUCCESS
    assert llm.streams[0].headers["authorization"] == f"Bearer {OPERATOR_KEY}"


async def test_link_local_and_metadata_addresses_are_refused_even_if_allowlisted(
    dispatcher: DispatcherServer,
    llm: ScriptedLLM,
    make_commander: Callable[..., Commander],
) -> None:
    metadata = "http://169.254.169.254/latest"
    packets = await run_one(
        dispatcher, make_commander, operator_settings(llm, allowed=[metadata]), naming(metadata)
    )
    assert_refused(packets, because="link-local")
    assert llm.streams == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://169.254.170.2/v2/credentials",
        "http://[fe80::1]/v1",
        "http://[fe80::1%25eth0]:8080/v1",
        "http://[fd00:ec2::254]/latest",
        "http://100.100.100.200/latest",
        "http://168.63.129.16/machine",
        "http://[::ffff:169.254.169.254]/v1",
        "http://[::ffff:a9fe:a9fe]/v1",
        "http://[64:ff9b::a9fe:a9fe]/v1",
        "http://0.0.0.0:8080/v1",
        "http://metadata.google.internal/computeMetadata/v1",
        "http://METADATA.google.internal./computeMetadata/v1",
        "http://metadata/computeMetadata/v1",
        "http://2852039166/v1",  # 169.254.169.254 in decimal: getaddrinfo reads it so
        "http://0xa9fea9fe/v1",
    ],
)
async def test_forbidden_addresses_whatever_the_allowlist(url: str) -> None:
    target = ModelTarget(url, "m", "", task_endpoint=True)
    with pytest.raises(EndpointNotAllowedError) as refused:
        await check_endpoint(target, [url], resolve_timeout=5)
    assert str(refused.value).startswith("model endpoint not allowed: ")


async def test_a_host_name_resolving_to_link_local_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked_up: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append((host, port))
        return ["203.0.113.7", "169.254.169.254"]  # one bad address is enough

    monkeypatch.setattr(_llm, "resolve_host", resolve)
    url = "https://models.example.com/v1"
    target = ModelTarget(url, "m", "", task_endpoint=True)
    with pytest.raises(EndpointNotAllowedError, match=r"169\.254\.169\.254"):
        await check_endpoint(target, ["https://models.example.com"], resolve_timeout=5)
    assert looked_up == [("models.example.com", 443)]
    # Not on the allowlist: refused without even a DNS lookup (a lookup leaks the name).
    looked_up.clear()
    with pytest.raises(EndpointNotAllowedError, match="allowlist"):
        await check_endpoint(target, ["https://other.example.com"], resolve_timeout=5)
    assert looked_up == []


async def test_a_host_name_that_does_not_resolve_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    monkeypatch.setattr(_llm, "resolve_host", resolve)
    target = ModelTarget("https://nowhere.example/v1", "m", "", task_endpoint=True)
    with pytest.raises(EndpointNotAllowedError, match="resolve"):
        await check_endpoint(target, ["https://nowhere.example"], resolve_timeout=5)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.example.com/v1", True),
        ("https://api.example.com/v1/", True),
        ("HTTPS://API.EXAMPLE.COM:443/v1/extra", True),
        ("https://api.example.com./v1", True),
        ("https://api.example.com/v10", False),  # a prefix ends at a path segment
        ("https://api.example.com/", False),
        ("http://api.example.com/v1", False),  # another scheme
        ("https://api.example.com:8443/v1", False),  # another port
        ("https://api.example.com.evil.net/v1", False),
        ("https://evil.net/api.example.com/v1", False),
        ("https://api.example.com/v1/../admin", False),  # dot segments
        ("https://api.example.com/v1/%2e%2e/admin", False),
        ("https://api.example.com/v1\\..\\admin", False),
        ("ftp://api.example.com/v1", False),
        ("file:///etc/passwd", False),
        ("https:///v1", False),
        ("https://%61pi.example.com/v1", False),  # an encoded host
        ("https://api.example.com@evil.net/v1", False),  # user info: the host is evil.net
        ("not a url", False),
        ("https://api.example.com/v1\r\nX: y", False),
    ],
)
async def test_allowlist_prefixes_compare_after_normalisation(
    url: str, allowed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["203.0.113.7"]

    monkeypatch.setattr(_llm, "resolve_host", resolve)
    target = ModelTarget(url, "m", "", task_endpoint=True)
    if allowed:
        await check_endpoint(target, ["https://api.example.com/v1/"], resolve_timeout=5)
    else:
        with pytest.raises(EndpointNotAllowedError):
            await check_endpoint(target, ["https://api.example.com/v1/"], resolve_timeout=5)


def test_allowlist_entries_are_checked_when_configured() -> None:
    assert parse_allowed_endpoints("") == ()
    assert parse_allowed_endpoints(" https://a.example/v1 , http://10.0.0.5:8000/v1,") == (
        "https://a.example/v1",
        "http://10.0.0.5:8000/v1",
    )
    for bad in ("ftp://a.example", "a.example/v1", "https://u:p@a.example/v1", "https://a/v1?x=1"):
        with pytest.raises(ValueError, match="allowed endpoint"):
            parse_allowed_endpoints(bad)
    with pytest.raises(ValueError):
        LLMSettings(allowed_endpoints=("gopher://x",))


def test_a_restored_task_whose_key_was_stripped_gets_no_operator_key() -> None:
    """After a dispatcher restart the task's own key is gone (stored configs are
    stripped of secrets); the operator's key must not take its place."""
    config = naming("https://models.example.com/v1", key="sk-the-tasks-own")
    config.stageModelConfig.actionGeneratorModel.ClearField("apiKey")  # what Strip does
    defaults = LLMSettings(base_url="http://127.0.0.1:8080/v1", api_key=OPERATOR_KEY)
    target = resolve_model(config, defaults)
    assert target.base_url == "https://models.example.com/v1"
    assert target.api_key == "" and target.task_endpoint
    # A provider (or a telling model name) is a client's choice of endpoint too.
    doubao = resolve_model(
        agent_pb2.CommonConfig(
            stageModelConfig=agent_pb2.StageModelConfig(
                actionGeneratorModel=agent_pb2.LLMConfig(modelName="doubao-1-5-ui-tars")
            )
        ),
        defaults,
    )
    assert doubao.base_url.startswith("https://ark.") and doubao.api_key == ""
    assert doubao.task_endpoint
    # A key alone (no endpoint) goes with the operator's endpoint; a model name alone too.
    key_only = agent_pb2.CommonConfig(
        stageModelConfig=agent_pb2.StageModelConfig(
            actionGeneratorModel=agent_pb2.LLMConfig(modelName="m", apiKey="sk-own")
        )
    )
    target = resolve_model(key_only, defaults)
    assert (target.base_url, target.api_key, target.task_endpoint) == (
        "http://127.0.0.1:8080/v1",
        "sk-own",
        False,
    )


async def test_error_bodies_from_a_model_endpoint_are_bounded_and_redacted(
    dispatcher: DispatcherServer,
    llm: ScriptedLLM,
    other: ScriptedLLM,
    make_commander: Callable[..., Commander],
) -> None:
    """What an endpoint answers comes back to the client as an event: bounded,
    no keys, no control characters (an SSRF'd service's page must not be relayed)."""
    secret_page = (
        "<html>" + "internal admin page \x00\x1b[31m " * 2000 + " sk-leaked-key-abcdef</html>"
    )
    body = json.dumps({"error": {"message": secret_page}}).encode()
    other.replies.append(Reply([], status=500, body=body))
    settings = operator_settings(llm, allowed=[other.base_url])
    packets = await run_one(
        dispatcher, make_commander, settings, naming(other.base_url, key="sk-task-key-987654")
    )
    error = packets[0].error
    assert error.code == "model_error" and "HTTP 500" in error.message
    assert len(error.message) <= 600, len(error.message)
    assert "sk-leaked" not in error.message and "sk-task-key" not in error.message
    assert "\x00" not in error.message and "\x1b" not in error.message


async def test_a_redirect_from_a_model_endpoint_is_not_followed(
    dispatcher: DispatcherServer,
    llm: ScriptedLLM,
    other: ScriptedLLM,
    make_commander: Callable[..., Commander],
) -> None:
    """An allowlisted endpoint must not send the commander elsewhere."""
    llm.replies.append(
        Reply([], status=307, headers={"location": f"{other.base_url}/chat/completions"})
    )
    packets = await run_one(dispatcher, make_commander, operator_settings(llm))
    assert packets[-1].result.outcome == ipb.SESSION_OUTCOME_FAILURE
    assert "HTTP 307" in packets[-1].result.message
    assert other.streams == []


def test_model_error_messages_stay_valid_text() -> None:
    import openai

    target = ModelTarget("https://api.example.com/v1", "m", "sk-mine-1234567")
    exc = openai.OpenAIError("bad \ud800 surrogate, Bearer abc.def-ghi and sk-mine-1234567")
    message = str(model_error(exc, target))
    message.encode("utf-8")  # no lone surrogate left
    assert "abc.def-ghi" not in message and "sk-mine" not in message


def test_the_flag_reaches_both_planners(monkeypatch: pytest.MonkeyPatch) -> None:
    from commander.__main__ import build_commander, build_parser

    monkeypatch.delenv("LLM_ALLOWED_ENDPOINTS", raising=False)
    default = build_commander(build_parser().parse_args([]))
    assert default.planners.get("chat").settings.allowed_endpoints == ()  # type: ignore[attr-defined]
    monkeypatch.setenv("LLM_ALLOWED_ENDPOINTS", "https://api.deepseek.com/v1")
    args = build_parser().parse_args([])
    assert args.llm_allowed_endpoints == ("https://api.deepseek.com/v1",)
    args = build_parser().parse_args(
        ["--llm-allowed-endpoints", "https://a.example/v1,http://10.0.0.5:8000/v1"]
    )
    commander = build_commander(args)
    for name in ("chat", "gui"):
        settings = commander.planners.get(name).settings  # type: ignore[attr-defined]
        assert settings.allowed_endpoints == ("https://a.example/v1", "http://10.0.0.5:8000/v1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--llm-allowed-endpoints", "file:///etc/passwd"])
