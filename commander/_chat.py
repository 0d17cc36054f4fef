"""The ``chat`` planner: a streaming chat agent on any OpenAI-compatible endpoint.

The same code path serves the embedded SmolLM2 (llama-cpp-python's server),
vLLM, Doubao ARK, DeepSeek, OpenAI...: only the base URL, model name and key
differ, and those come from the task's config
(``stageModelConfig.actionGeneratorModel``) with the commander's defaults
behind them (resolved, like the HTTP pool and error redaction, by
:mod:`commander._llm`). An endpoint the task names itself must be on
``allowed_endpoints`` and gets the task's own key or none, never the default
one; otherwise the session fails before any request.

Interruption: the planner is an async generator with no task group in it.
When the session is stopped, the cancellation arrives either inside the model
stream's read or at a ``yield`` (as ``GeneratorExit``); in both cases the
``finally`` closes the HTTP response under a shielded, time-bounded scope, so a
self-hosted model server sees the connection close and stops generating. The
tokens already streamed are recorded with ``ctx.add_usage`` and reach the
dispatcher in ``stopped.final_usage``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Any, cast

import anyio
import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from opentelemetry.trace import StatusCode

from commander import _metrics
from commander._context import PlannerOutput, SessionContext
from commander._errors import ModelError, ToolError, tool_error_code_name
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.lybic.agent import agent_pb2
from commander._llm import (
    DEFAULT_API_KEY,
    DEFAULT_BASE_URL,
    FirstToken,
    ModelClients,
    ModelTarget,
    check_endpoint,
    close_model_stream,
    empty_stream_error,
    estimate_tokens,
    model_error,
    parse_allowed_endpoints,
    public_url,
    request_headers,
    target_from,
)
from commander._pricing import PriceTable
from commander._text import valid_text
from commander._timeouts import MODEL_CLOSE_TIMEOUT
from commander._tracing import end_model_span, model_span

_log = logging.getLogger("commander.chat")

DEFAULT_MODEL = "smollm2"


@dataclasses.dataclass(frozen=True)
class LLMSettings:
    """The chat planner's defaults and limits (a task's config overrides the model)."""

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    #: The operator's key: sent only to ``base_url`` (and URLs under it).
    api_key: str = dataclasses.field(default=DEFAULT_API_KEY, repr=False)
    #: URL prefixes a task may name as its own endpoint besides ``base_url``
    #: (``--llm-allowed-endpoints``); see :func:`commander._llm.check_endpoint`.
    allowed_endpoints: tuple[str, ...] = ()
    #: Seconds to wait for the next streamed chunk (and for the first one).
    read_timeout: float = 120.0
    connect_timeout: float = 10.0
    #: Model turns per session (tool round trips included); the last one is
    #: made without tools so that the model has to answer.
    max_turns: int = 8
    temperature: float | None = None
    max_tokens: int | None = None
    system_prompt: str | None = None
    #: Offer the session's tools to the model (function calling).
    use_tools: bool = True
    #: Name prefixes of tools never offered to the chat model, e.g.
    #: ("computer.", "mobile."): the GUI tools' 25 schemas fill most of a
    #: small model's context (SmolLM2: 4,096 tokens).
    exclude_tool_prefixes: tuple[str, ...] = ()
    #: Bound on closing the model stream after a stop (see commander._timeouts).
    close_timeout: float = MODEL_CLOSE_TIMEOUT
    #: Per-model prices: the cost and currency of every Usage.
    prices: PriceTable = dataclasses.field(default_factory=PriceTable)

    def __post_init__(self) -> None:
        parse_allowed_endpoints(self.allowed_endpoints)  # ValueError for a bad entry

    def usage(self, model: str, input_tokens: int, output_tokens: int) -> ipb.Usage:
        """One model turn's Usage, priced from :attr:`prices` (0 and no currency if unknown)."""
        cost, currency = self.prices.cost(model, input_tokens, output_tokens)
        return ipb.Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost=cost,
            currency=currency,
            steps=1,
            model=model,
        )


def resolve_model(config: agent_pb2.CommonConfig, defaults: LLMSettings) -> ModelTarget:
    """Task config (``stageModelConfig.actionGeneratorModel``) over the commander's defaults.

    The default key goes only with the default endpoint (see
    :func:`commander._llm.target_from`).
    """
    target = ModelTarget(base_url=defaults.base_url, model=defaults.model, api_key=defaults.api_key)
    if config.HasField("stageModelConfig"):
        stages = config.stageModelConfig
        if stages.HasField("actionGeneratorModel"):
            return target_from(stages.actionGeneratorModel, target, operator=(target,))
    return target


class ToolNames:
    """Reversible map between dispatcher tool names and OpenAI function names.

    OpenAI function names must match ``^[A-Za-z0-9_-]{1,64}$``; ours may contain
    dots (``workspace.read_file``). ``.`` becomes ``__``, anything else invalid
    ``_``; collisions and over-long names get a numeric suffix. A name the model
    invents maps to itself, so the dispatcher answers it with UNKNOWN_TOOL.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._to_openai: dict[str, str] = {}
        self._to_tool: dict[str, str] = {}
        for name in names:
            base = re.sub(r"[^A-Za-z0-9_-]", "_", name.replace(".", "__")) or "tool"
            candidate, n = base[:64], 1
            while candidate in self._to_tool:
                n += 1
                suffix = f"_{n}"
                candidate = base[: 64 - len(suffix)] + suffix
            self._to_openai[name] = candidate
            self._to_tool[candidate] = name

    def to_openai(self, name: str) -> str:
        return self._to_openai[name]

    def to_tool(self, function_name: str) -> str:
        return self._to_tool.get(function_name, function_name)


class ThinkSplitter:
    """Splits streamed content into reasoning (inside ``<think>…</think>``) and answer.

    Tags may be cut anywhere between chunks; a possible partial tag at the end
    of a chunk is held back until the next chunk decides it.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self._buf = ""
        self.thinking = False

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """(is_thought, text) pieces that are certain so far."""
        self._buf += text
        out: list[tuple[bool, str]] = []
        while True:
            tag = self.CLOSE if self.thinking else self.OPEN
            i = self._buf.find(tag)
            if i >= 0:
                if i:
                    out.append((self.thinking, self._buf[:i]))
                self._buf = self._buf[i + len(tag) :]
                self.thinking = not self.thinking
                continue
            keep = _partial_suffix(self._buf, tag)
            cut = len(self._buf) - keep
            if cut:
                out.append((self.thinking, self._buf[:cut]))
                self._buf = self._buf[cut:]
            return out

    def flush(self) -> list[tuple[bool, str]]:
        """Whatever is held back, at the end of the stream."""
        rest, self._buf = self._buf, ""
        return [(self.thinking, rest)] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _openai_tools(tools: Sequence[ipb.ToolSpec], names: ToolNames) -> list[dict[str, Any]]:
    result = []
    for spec in tools:
        try:
            parameters = json.loads(spec.parameters_json_schema or "{}")
        except ValueError:
            parameters = {}
        if not isinstance(parameters, dict) or not parameters:
            parameters = {"type": "object", "properties": {}}
        result.append(
            {
                "type": "function",
                "function": {
                    "name": names.to_openai(spec.name),
                    "description": spec.description,
                    "parameters": parameters,
                },
            }
        )
    return result


def _history_messages(history: Iterable[ipb.ConversationTurn]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for turn in history:
        if turn.role in ("user", "assistant", "system"):
            messages.append({"role": turn.role, "content": turn.content})
        elif turn.role == "tool":
            # A "tool" message must answer a tool_calls id the history does not
            # keep; told as the assistant's own note instead.
            messages.append({"role": "assistant", "content": f"[tool result] {turn.content}"})
        else:
            messages.append({"role": "user", "content": turn.content})
    return messages


#: How long an endpoint's model list is trusted, and how long reading it may take.
_MODELS_TTL = 60.0
_MODELS_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class _Model:
    """What a session's requests go to."""

    target: ModelTarget
    client: openai.AsyncOpenAI
    timeout: openai.Timeout


@dataclasses.dataclass
class _ToolCallDraft:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclasses.dataclass
class _Turn:
    """What one streamed model turn produced."""

    answer: list[str] = dataclasses.field(default_factory=list)
    tool_calls: dict[int, _ToolCallDraft] = dataclasses.field(default_factory=dict)
    chunks: int = 0  # streamed pieces: the output-token estimate
    usage: CompletionUsage | None = None  # the server's, when it sent one
    received: int = 0  # chunks of any kind the server sent
    finish_reason: str | None = None
    model: str = ""  # the model the server's chunks name


class ChatPlanner:
    """The ``chat`` planner (register it under any name; ``chat`` by default).

    Streams reasoning as ``ThoughtChain`` and the answer as ``ContentChunk``
    (``is_finish`` on an empty last chunk of each answer), one ``Usage`` per
    model turn (``steps=1``), calls the session's tools through function
    calling, and ends with a ``FinalResult`` carrying the last answer.
    """

    def __init__(self, settings: LLMSettings | None = None) -> None:
        self.settings = settings or LLMSettings()
        # Request options an endpoint refused (400/422) before streaming: left
        # out from then on. Keyed by base URL.
        self._unsupported: dict[str, set[str]] = {}
        # The models an endpoint lists (GET /models), with when they were
        # read: a single-model server (llama-cpp-python) answers to any name.
        self._listed: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._clients = ModelClients(
            read_timeout=self.settings.read_timeout,
            connect_timeout=self.settings.connect_timeout,
        )

    def _timeout(self, ctx: SessionContext) -> openai.Timeout:
        """Per-request timeout: the read timeout, cut short by the task's deadline."""
        read = self.settings.read_timeout
        remaining = ctx.time_remaining()
        if remaining is not None:
            read = max(1.0, min(read, remaining))
        return openai.Timeout(read, connect=self.settings.connect_timeout)

    async def aclose(self) -> None:
        """Close the shared HTTP pool (the commander calls this when it stops)."""
        await self._clients.aclose()

    async def __call__(self, ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
        target = resolve_model(ctx.config, self.settings)
        # Before anything is sent: a refusal fails the session with the reason.
        await check_endpoint(
            target,
            self.settings.allowed_endpoints,
            resolve_timeout=self.settings.connect_timeout,
        )
        tools = [t for t in ctx.tools if not t.name.startswith(self.settings.exclude_tool_prefixes)]
        names = ToolNames(spec.name for spec in tools)
        offered = _openai_tools(tools, names) if self.settings.use_tools and tools else []
        messages: list[dict[str, Any]] = []
        system = ctx.system_prompt(self.settings.system_prompt)
        if system:
            messages.append({"role": "system", "content": system})
        messages.extend(_history_messages(ctx.history))
        messages.append({"role": "user", "content": ctx.instruction})
        model = _Model(target, await self._clients.client(target), self._timeout(ctx))
        answer = ""
        tool_calls_made = 0
        turns = 0
        for turns in range(1, self.settings.max_turns + 1):
            for user_input in ctx.drain_user_inputs():
                messages.append({"role": "user", "content": user_input.text})
            last = turns == self.settings.max_turns
            turn = _Turn()
            # aclosing: a stop at our yield must close the inner generator (and
            # with it the model stream) now, not whenever it is collected.
            async with contextlib.aclosing(
                self._stream_turn(ctx, model, messages, [] if last else offered, turn)
            ) as outputs:
                async for output in outputs:
                    yield output
            answer = "".join(turn.answer)
            if not turn.tool_calls:
                interjected = ctx.drain_user_inputs()
                if interjected and not last:
                    # Messages that came in while the model answered get a turn too.
                    messages.append({"role": "assistant", "content": answer})
                    messages.extend({"role": "user", "content": u.text} for u in interjected)
                    continue
                break
            calls = [turn.tool_calls[i] for i in sorted(turn.tool_calls)]
            messages.append(
                {
                    "role": "assistant",
                    "content": answer or None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }
                        for call in calls
                    ],
                }
            )
            for call in calls:
                tool_calls_made += 1
                content = await self._run_tool(ctx, names.to_tool(call.name), call.arguments)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
        ran = turn.model or target.model
        named = ran if ran == target.model else f"{ran} (requested {target.model})"
        yield ipb.FinalResult(
            outcome=ipb.SESSION_OUTCOME_SUCCESS,
            result=answer,
            message=f"{turns} model turn(s), {tool_calls_made} tool call(s), model {named}",
        )

    async def _run_tool(self, ctx: SessionContext, tool: str, arguments: str) -> str:
        """Call a tool through the dispatcher; errors go back to the model as text."""
        try:
            return await ctx.call_tool_json(tool, arguments or "{}")
        except ToolError as exc:
            ctx.logger.info("tool %s failed: %s", tool, exc.message)
            code = tool_error_code_name(exc.error_code).removeprefix("TOOL_ERROR_CODE_")
            return json.dumps({"error": {"code": code, "message": exc.message}})

    async def _model_that_ran(self, model: _Model, reported: str) -> str:
        """The model that answered: the one the server's chunks name when it is
        not the requested one (e.g. a dated version); else, when the endpoint
        lists exactly one model under another name, that one (a single-model
        server such as llama-cpp-python echoes any requested name); else the
        requested name."""
        requested = model.target.model
        if reported and reported != requested:
            return reported
        base = model.target.base_url
        now = time.monotonic()
        listed = self._listed.get(base)
        if listed is None or now - listed[0] > _MODELS_TTL:
            names: tuple[str, ...] = ()
            try:
                with anyio.fail_after(_MODELS_TIMEOUT):
                    page = await model.client.models.list(
                        timeout=_MODELS_TIMEOUT, extra_headers=request_headers(model.target)
                    )
                names = tuple(m.id for m in page.data)
            except (openai.OpenAIError, TimeoutError):
                pass  # no list: the requested name is all there is to say
            listed = self._listed[base] = (now, names)
        names = listed[1]
        if len(names) == 1 and names[0] != requested:
            return names[0]
        return requested

    async def _why_empty(
        self, model: _Model, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> ModelError:
        """Why a model stream ended without a chunk (see empty_stream_error)."""
        target = model.target
        request: dict[str, Any] = {
            "model": target.model,
            "messages": messages,
            "timeout": model.timeout,
            "extra_headers": request_headers(target),
        }
        if tools and "tools" not in self._unsupported.get(target.base_url, set()):
            request["tools"] = tools
        return await empty_stream_error(model.client, target, request)

    async def _open_stream(
        self,
        model: _Model,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
    ) -> openai.AsyncStream[ChatCompletionChunk]:
        target = model.target
        unsupported = self._unsupported.setdefault(target.base_url, set())
        while True:
            request: dict[str, Any] = {
                "model": target.model,
                "messages": messages,
                "stream": True,
                "timeout": model.timeout,
                "extra_headers": request_headers(target),
            }
            if "stream_options" not in unsupported:
                request["stream_options"] = {"include_usage": True}
            if tools and "tools" not in unsupported:
                request["tools"] = tools
            if self.settings.temperature is not None:
                request["temperature"] = self.settings.temperature
            if self.settings.max_tokens is not None:
                request["max_tokens"] = self.settings.max_tokens
            try:
                created = await model.client.chat.completions.create(**request)
                return cast("openai.AsyncStream[ChatCompletionChunk]", created)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                # Nothing was streamed yet, so trying again is safe. Drop the
                # optional extras one at a time (older servers reject them).
                extra = next((k for k in ("stream_options", "tools") if k in request), None)
                if extra is None:
                    raise model_error(exc, target) from exc
                _log.warning(
                    "%s refused %s (%s); retrying without it",
                    public_url(target.base_url),
                    extra,
                    exc.status_code,
                )
                unsupported.add(extra)
            except openai.OpenAIError as exc:
                raise model_error(exc, target) from exc

    async def _stream_turn(
        self,
        ctx: SessionContext,
        model: _Model,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        turn: _Turn,
    ) -> AsyncGenerator[PlannerOutput, None]:
        target = model.target
        prompt_estimate = estimate_tokens(json.dumps(messages)) + (
            estimate_tokens(json.dumps(tools)) if tools else 0
        )
        completed = False
        refused = False  # the server took nothing: no tokens were spent
        stream: openai.AsyncStream[ChatCompletionChunk] | None = None
        splitter = ThinkSplitter()
        metrics = _metrics.current
        started = time.monotonic()
        # Not made current: this generator yields to its consumer, which must not
        # run inside the span's context.
        span = model_span(target.model, public_url(target.base_url))
        first_token = FirstToken(span, target.model, started)
        try:
            stream = await self._open_stream(model, messages, tools)
            async for chunk in stream:
                first_token.chunk()
                turn.received += 1
                if not turn.model and isinstance(chunk.model, str):
                    turn.model = chunk.model
                if chunk.usage is not None:
                    turn.usage = chunk.usage
                if not chunk.choices:
                    continue
                if chunk.choices[0].finish_reason:
                    turn.finish_reason = chunk.choices[0].finish_reason
                delta = chunk.choices[0].delta
                extra = delta.model_extra or {}
                reasoning = extra.get("reasoning_content") or extra.get("reasoning")
                if isinstance(reasoning, str) and reasoning:
                    turn.chunks += 1
                    yield ipb.ThoughtChain(step_name="Reasoning", delta=valid_text(reasoning))
                if delta.content:
                    turn.chunks += 1
                    # JSON-decoded: a "\ud83d" escape is a lone surrogate here.
                    for output in _split(splitter.feed(valid_text(delta.content)), turn):
                        yield output
                for tc in delta.tool_calls or ():
                    turn.chunks += 1
                    draft = turn.tool_calls.setdefault(tc.index, _ToolCallDraft())
                    if tc.id:
                        draft.id = tc.id
                    if tc.function is not None:
                        # Most servers send the name once; some repeat it per chunk.
                        if tc.function.name and tc.function.name != draft.name:
                            draft.name += tc.function.name
                        if tc.function.arguments:
                            draft.arguments += tc.function.arguments
            for output in _split(splitter.flush(), turn):
                yield output
            if turn.received == 0:
                # Not an empty answer: the server ended the stream without a
                # single chunk (llama-cpp-python does so, with 200, for a
                # prompt over its context window). Never an empty success:
                # the reason is asked for once the stream is closed (below).
                refused = True
            elif turn.finish_reason == "length" and not turn.answer and not turn.tool_calls:
                raise ModelError(
                    f"model {target.model} at {public_url(target.base_url)}: it reached its "
                    "length limit (finish_reason=length) before any answer"
                )
            else:
                completed = True
            if metrics is not None and completed:
                metrics.observe_step("chat", time.monotonic() - started)
        except openai.OpenAIError as exc:
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise model_error(exc, target) from exc
        finally:
            if stream is not None:
                await close_model_stream(stream, self.settings.close_timeout)
            if stream is not None and not completed and not refused:
                # Stopped or failed mid-turn: the tokens spent so far still count
                # (estimated: a stream cut short carries no usage from the server).
                cost, currency = self.settings.prices.cost(
                    target.model, prompt_estimate, turn.chunks
                )
                ctx.add_usage(
                    input_tokens=prompt_estimate,
                    output_tokens=turn.chunks,
                    cost=cost,
                    currency=currency,
                    steps=1,
                    model=target.model,
                )
            end_model_span(span, turn.usage, completed=completed)
        if refused:
            raise await self._why_empty(model, messages, tools)
        for draft in turn.tool_calls.values():
            if not draft.id:
                draft.id = f"call_{uuid.uuid4().hex[:12]}"
        if turn.answer:
            # The answer of this turn is complete (an empty last chunk, as in seed 004).
            yield ipb.ContentChunk(text="", is_finish=True)
        ran = turn.model = await self._model_that_ran(model, turn.model)
        if turn.usage is not None:
            yield self.settings.usage(ran, turn.usage.prompt_tokens, turn.usage.completion_tokens)
        else:
            # The server sent no usage (no stream_options support): estimated,
            # output tokens = streamed pieces (servers stream about one token each).
            yield self.settings.usage(ran, prompt_estimate, turn.chunks)


def _split(pieces: list[tuple[bool, str]], turn: _Turn) -> list[PlannerOutput]:
    outputs: list[PlannerOutput] = []
    for is_thought, text in pieces:
        if is_thought:
            outputs.append(ipb.ThoughtChain(step_name="Reasoning", delta=text))
        else:
            turn.answer.append(text)
            outputs.append(ipb.ContentChunk(text=text))
    return outputs
