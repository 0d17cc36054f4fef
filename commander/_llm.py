"""Model plumbing every planner shares: targets, the HTTP pool, closing and redaction.

* :class:`ModelTarget` and :func:`target_from`: which endpoint, model and key a
  task's ``LLMConfig`` names, with defaults behind it (a provider or a
  telling model name stands for its OpenAI-compatible endpoint);
* :class:`ModelClients`: one HTTP connection pool per planner for all its
  sessions and endpoints, and ``AsyncOpenAI`` clients on it that never retry;
* :func:`close_model_stream`: closes a streamed response the way a stop needs;
* :class:`FirstToken`: records when a streamed response's first chunk came;
* :func:`model_error` and :func:`public_url`: errors and URLs with no secrets,
  fit for task events that clients read.

It owns no planning logic and must not import a planner or the session runtime.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import urllib.parse
from typing import Protocol

import anyio
import anyio.to_thread
import openai
from opentelemetry import trace

from commander import _metrics
from commander._errors import ModelError
from commander._gen.lybic.agent import agent_pb2

#: The embedded model server (llama-cpp-python) on its default port.
DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
#: Local servers want some key; they do not check it.
DEFAULT_API_KEY = "none"

# Where a provider's OpenAI-compatible API lives, for tasks that name a
# provider (or a model whose name gives it away, as seed 000 does for doubao,
# gemini and deepseek) but no apiEndpoint.
PROVIDER_ENDPOINTS = {
    "doubao": "https://ark.cn-beijing.volces.com/api/v3",
    "ark": "https://ark.cn-beijing.volces.com/api/v3",
    "deepseek": "https://api.deepseek.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai/",
    "openai": "https://api.openai.com/v1",
}
MODEL_PREFIX_PROVIDERS = ("doubao", "deepseek", "gemini")


@dataclasses.dataclass(frozen=True)
class ModelTarget:
    """The model a session talks to, resolved from the task config and the defaults."""

    base_url: str
    model: str
    api_key: str = dataclasses.field(repr=False)


def target_from(llm: agent_pb2.LLMConfig, fallback: ModelTarget) -> ModelTarget:
    """The target an ``LLMConfig`` names, ``fallback`` filling what it leaves out.

    Endpoint: ``apiEndpoint``, else the endpoint of ``provider`` (or of the
    provider the model's name starts with), else the fallback's.
    """
    model = llm.modelName or fallback.model
    api_key = llm.apiKey if llm.HasField("apiKey") and llm.apiKey else fallback.api_key
    if llm.HasField("apiEndpoint") and llm.apiEndpoint:
        base_url = llm.apiEndpoint
    else:
        provider = llm.provider.lower() if llm.HasField("provider") else ""
        if not provider and llm.modelName:
            lower = llm.modelName.lower()
            provider = next((p for p in MODEL_PREFIX_PROVIDERS if lower.startswith(p)), "")
        base_url = PROVIDER_ENDPOINTS.get(provider, fallback.base_url)
    return ModelTarget(base_url=base_url, model=model, api_key=api_key)


class ModelClients:
    """``AsyncOpenAI`` clients that share one HTTP connection pool.

    Building an HTTP client loads the CA bundle (tens of ms of blocked event
    loop): far too slow per session, so the pool is built once, in a worker
    thread, and every session and endpoint reuses it. Clients never retry: a
    retry after tokens were streamed would repeat them, so any retry is the
    planner's own, made only before the first token.
    """

    def __init__(self, *, read_timeout: float, connect_timeout: float) -> None:
        self._timeout = openai.Timeout(read_timeout, connect=connect_timeout)
        self._http: openai.DefaultAsyncHttpxClient | None = None

    async def client(self, target: ModelTarget) -> openai.AsyncOpenAI:
        """A client for ``target`` on the shared pool (built on first use)."""
        if self._http is None:
            http = await anyio.to_thread.run_sync(openai.DefaultAsyncHttpxClient)
            if self._http is None:
                self._http = http
            else:  # another session built one meanwhile
                await http.aclose()
        return openai.AsyncOpenAI(
            base_url=target.base_url,
            api_key=target.api_key,
            max_retries=0,
            timeout=self._timeout,
            http_client=self._http,
        )

    async def aclose(self) -> None:
        """Close the pool (the commander calls its planners' ``aclose`` when it stops)."""
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()


class _Closable(Protocol):
    async def close(self) -> None: ...


async def close_model_stream(stream: _Closable, bound: float) -> None:
    """Close a streamed response: shielded, so it happens even while a stop cancels
    us; bounded by ``bound`` seconds, so a stuck server cannot hold the stop up.

    Closing the response is what makes a self-hosted model stop generating.
    ``bound`` must stay below the session's stop bound (see
    :mod:`commander._timeouts`), or the planner's cleanup is abandoned first.
    """
    with anyio.move_on_after(bound, shield=True):
        await stream.close()


class FirstToken:
    """Records a streamed model response's first chunk: a ``first token`` event on
    its span and commander_model_time_to_first_token_seconds, counted from
    ``started`` (when the request was sent)."""

    def __init__(self, span: trace.Span, model: str, started: float) -> None:
        self._span = span
        self._model = model
        self._started = started
        self._metrics = _metrics.current
        self._seen = False

    def chunk(self) -> None:
        """Call for every chunk; only the first is recorded."""
        if self._seen:
            return
        self._seen = True
        self._span.add_event("first token")
        if self._metrics is not None:
            self._metrics.observe_first_token(self._model, time.monotonic() - self._started)


def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters a token) for servers that report no usage."""
    return math.ceil(len(text) / 4)


_KEY_LIKE = re.compile(r"\b(?:sk|ak|pk)-[\w*.\-]{6,}")


def public_url(url: str) -> str:
    """The URL without user info or query (they may carry credentials)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def model_error(exc: openai.OpenAIError, target: ModelTarget) -> ModelError:
    """A client-safe description: it becomes a task event that clients read."""
    if isinstance(exc, openai.APIStatusError):
        detail = f"HTTP {exc.status_code}: {exc.message}"
    elif isinstance(exc, openai.APITimeoutError):
        detail = "timed out"
    elif isinstance(exc, openai.APIConnectionError):
        detail = "connection failed"
    else:
        detail = str(exc)
    if target.api_key:
        detail = detail.replace(target.api_key, "[redacted]")
    detail = _KEY_LIKE.sub("[redacted]", detail)
    return ModelError(f"model {target.model} at {public_url(target.base_url)}: {detail}")
