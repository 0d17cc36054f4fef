"""Model plumbing every planner shares: targets, the HTTP pool, closing and redaction.

* :class:`ModelTarget` and :func:`target_from`: which endpoint, model and key a
  task's ``LLMConfig`` names, with defaults behind it (a provider or a
  telling model name stands for its OpenAI-compatible endpoint);
* :func:`check_endpoint`: whether a task may send its model calls to the
  endpoint it named (the allowlist, ``--llm-allowed-endpoints``; never a
  link-local or cloud metadata address);
* :class:`ModelClients`: one HTTP connection pool per planner for all its
  sessions and endpoints, and ``AsyncOpenAI`` clients on it that never retry
  and never follow a redirect;
* :func:`close_model_stream`: closes a streamed response the way a stop needs;
* :class:`FirstToken`: records when a streamed response's first chunk came;
* :func:`model_error` and :func:`public_url`: errors and URLs with no secrets,
  bounded, fit for task events that clients read.

Credentials: the operator's key (a planner's default ``api_key``) goes only to
the operator's endpoint (the planner's default ``base_url``, compared after
normalisation: scheme, host, port, path prefix). An endpoint a task names
itself gets the task's own key or none, and none of the process's ambient
OpenAI settings (``OPENAI_ORG_ID``... : see :func:`request_headers`).

It owns no planning logic and must not import a planner or the session runtime.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import anyio
import anyio.to_thread
import openai
from opentelemetry import trace

from commander import _metrics
from commander._errors import EndpointNotAllowedError, ModelError
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
    #: The task named this endpoint and it is not the operator's: it must pass
    #: :func:`check_endpoint` before any request, and ``api_key`` is the task's
    #: own ("" for none), never the operator's.
    task_endpoint: bool = False


def target_from(
    llm: agent_pb2.LLMConfig,
    fallback: ModelTarget,
    operator: Sequence[ModelTarget] = (),
) -> ModelTarget:
    """The target an ``LLMConfig`` names, ``fallback`` filling what it leaves out.

    Endpoint: ``apiEndpoint``, else the endpoint of ``provider`` (or of the
    provider the model's name starts with), else the fallback's.

    Key: the config's own ``apiKey``; else, when the endpoint is the
    fallback's (the config names none), the fallback's key; else, when the
    named endpoint is one of ``operator``'s (at or under its base URL), that
    target's key; else none. A key never moves to an endpoint it did not come
    with: a task endpoint (``task_endpoint=True``) gets the task's key or none.
    """
    model = llm.modelName or fallback.model
    own_key = llm.apiKey if llm.HasField("apiKey") and llm.apiKey else ""
    named = ""
    if llm.HasField("apiEndpoint") and llm.apiEndpoint:
        named = llm.apiEndpoint
    else:
        provider = llm.provider.lower() if llm.HasField("provider") else ""
        if not provider and llm.modelName:
            lower = llm.modelName.lower()
            provider = next((p for p in MODEL_PREFIX_PROVIDERS if lower.startswith(p)), "")
        named = PROVIDER_ENDPOINTS.get(provider, "")
    if not named:
        return dataclasses.replace(fallback, model=model, api_key=own_key or fallback.api_key)
    owner = next((t for t in operator if _under(named, t.base_url)), None)
    if owner is not None:
        return ModelTarget(base_url=named, model=model, api_key=own_key or owner.api_key)
    return ModelTarget(base_url=named, model=model, api_key=own_key, task_endpoint=True)


# --- where a task's model calls may go ---


@dataclasses.dataclass(frozen=True)
class _Endpoint:
    """A URL reduced to what decides where a request goes."""

    scheme: str
    host: str  # lower case, IDNA, no trailing dot; an IP address in its compressed form
    port: int
    path: str  # no trailing "/": "" for the root

    def under(self, prefix: _Endpoint) -> bool:
        """At or under ``prefix``: same scheme, host and port; its path, segment-wise."""
        return (self.scheme, self.host, self.port) == (
            prefix.scheme,
            prefix.host,
            prefix.port,
        ) and (self.path == prefix.path or self.path.startswith(prefix.path + "/"))


# Characters that have no business in a base URL (header injection, odd parsing).
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
# Path tricks that a server or proxy may resolve differently from a string prefix.
_BAD_PATH = re.compile(r"%(?:2e|2f|5c|00)", re.IGNORECASE)


def _endpoint(url: str) -> _Endpoint:
    """``url`` normalised; ``ValueError`` (the reason) for anything we would not call."""
    if _BAD_URL_CHARS.search(url):
        raise ValueError("whitespace, control characters or backslashes in the URL")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("not an http or https URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("no host")
    port = parts.port or (443 if scheme == "https" else 80)  # ValueError if out of range
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        if "%" in host:  # percent-encoded: an HTTP client may decode it, we would not
            raise ValueError("an encoded host name") from None
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise ValueError("an invalid host name") from None
    path = parts.path
    if any(seg in (".", "..") for seg in path.split("/")) or _BAD_PATH.search(path):
        raise ValueError("dot segments or encoded separators in the path")
    return _Endpoint(scheme, host, port, path.rstrip("/"))


def _under(url: str, prefix: str) -> bool:
    try:
        return _endpoint(url).under(_endpoint(prefix))
    except ValueError:
        return False


def parse_allowed_endpoints(text: str | Iterable[str]) -> tuple[str, ...]:
    """The allowlist ``--llm-allowed-endpoints`` gives (a comma list of URL prefixes),
    each entry checked: http(s), a host, no user info, query or fragment."""
    entries = text.split(",") if isinstance(text, str) else text
    allowed: list[str] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            _endpoint(entry)
            parts = urllib.parse.urlsplit(entry)
            if parts.username is not None or parts.password is not None:
                raise ValueError("user info in the URL")
            if parts.query or parts.fragment:
                raise ValueError("a query or fragment in the URL")
        except ValueError as exc:
            raise ValueError(f"allowed endpoint {entry!r}: {exc}") from None
        allowed.append(entry)
    return tuple(allowed)


#: Never called, whatever the allowlist says: link-local (where every cloud
#: puts its instance metadata and credentials: AWS, GCP, Azure, OCI at
#: 169.254.169.254, ECS at 169.254.170.2) and the metadata addresses outside it.
FORBIDDEN_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # IPv4 link-local
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS instance metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "168.63.129.16/32",  # Azure WireServer
        "0.0.0.0/8",  # "this host": reaches local services by another name
        "::/128",
    )
)
#: Metadata host names, refused by name before any lookup.
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and _forbidden(embedded):
            return True
    return any(address in net for net in FORBIDDEN_NETWORKS if net.version == address.version)


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (the event loop's resolver, off the loop)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def check_endpoint(
    target: ModelTarget, allowed: Sequence[str], *, resolve_timeout: float
) -> None:
    """Refuse (:class:`EndpointNotAllowedError`) the endpoint of a task's target unless
    it is on ``allowed`` (URL prefixes) and none of its addresses is link-local or a
    cloud metadata address. The operator's targets (``task_endpoint`` False) pass.

    The allowlist is checked first: a name that is not on it is not even looked
    up. Loopback and private addresses are not refused as such: a task reaches
    one only through the allowlist (the default endpoint itself is loopback).
    The name is resolved again when the request is made; an allowlisted host
    whose DNS answers change in between (rebinding) is the allowlist's trust.
    """
    if not target.task_endpoint:
        return
    shown = _bounded(public_url(target.base_url), _URL_CHARS)

    def refuse(reason: str) -> EndpointNotAllowedError:
        return EndpointNotAllowedError(f"model endpoint not allowed: {shown}: {reason}")

    try:
        endpoint = _endpoint(target.base_url)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    if not any(_under(target.base_url, prefix) for prefix in allowed):
        raise refuse("not on the allowlist (--llm-allowed-endpoints)")
    if endpoint.host in METADATA_HOSTS:
        raise refuse("a cloud metadata host")
    try:
        addresses = [endpoint.host]
        ipaddress.ip_address(endpoint.host)
    except ValueError:
        try:
            with anyio.fail_after(resolve_timeout):
                addresses = await resolve_host(endpoint.host, endpoint.port)
        except TimeoutError:
            raise refuse(f"{endpoint.host} did not resolve within {resolve_timeout:g} s") from None
        except OSError as exc:
            raise refuse(f"{endpoint.host} does not resolve ({exc.strerror or exc})") from None
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            raise refuse(f"{endpoint.host} resolves to {text!r}, not an address") from None
        if _forbidden(address):
            raise refuse(
                f"{endpoint.host} is (or resolves to) {address}, a link-local or "
                "cloud metadata address"
            )


def request_headers(target: ModelTarget) -> dict[str, str | openai.Omit]:
    """Per-request headers (``extra_headers``) for ``target``: none for the operator's
    endpoint; for a task's, its own key or no ``Authorization`` at all, and none of
    the headers the OpenAI SDK takes from the environment (``OPENAI_ORG_ID``,
    ``OPENAI_PROJECT_ID``, ``OPENAI_CUSTOM_HEADERS``), which are the operator's."""
    if not target.task_endpoint:
        return {}
    headers: dict[str, str | openai.Omit] = {
        "OpenAI-Organization": openai.Omit(),
        "OpenAI-Project": openai.Omit(),
    }
    for line in os.environ.get("OPENAI_CUSTOM_HEADERS", "").splitlines():
        name = line.partition(":")[0].strip()
        if name:
            headers[name] = openai.Omit()
    headers["Authorization"] = f"Bearer {target.api_key}" if target.api_key else openai.Omit()
    return headers


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
        """A client for ``target`` on the shared pool (built on first use).

        Requests to a task's endpoint must carry :func:`request_headers`: the
        client's own key is a placeholder there when the task gave none.
        """
        if self._http is None:
            # No redirects: a model endpoint answering a POST with one is
            # misconfigured, and following it would let an allowed host send
            # the commander anywhere (169.254.169.254 included).
            http = await anyio.to_thread.run_sync(
                lambda: openai.DefaultAsyncHttpxClient(follow_redirects=False)
            )
            if self._http is None:
                self._http = http
            else:  # another session built one meanwhile
                await http.aclose()
        return openai.AsyncOpenAI(
            base_url=target.base_url,
            api_key=target.api_key or DEFAULT_API_KEY,
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
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[^\s'\",;]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
#: Bounds of what an error event says about a model call.
_DETAIL_CHARS = 300
_URL_CHARS = 200
_MODEL_CHARS = 100


def _bounded(text: str, limit: int) -> str:
    """``text`` as one line of valid UTF-8 (no control characters, no lone
    surrogates), cut to ``limit`` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = _CONTROL.sub(" ", text)
    text = re.sub(r" {2,}", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def public_url(url: str) -> str:
    """The URL without user info or query (they may carry credentials)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port:
        host = f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def model_error(exc: openai.OpenAIError, target: ModelTarget) -> ModelError:
    """A client-safe description: it becomes a task event that clients read.

    An error body may be anything the endpoint chose to send (a proxy's page,
    an internal service's answer): only its ``error.message`` (else the SDK's
    message) is kept, with keys and control characters removed, bounded.
    """
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else None
        detail = f"HTTP {exc.status_code}: {message if isinstance(message, str) else exc.message}"
    elif isinstance(exc, openai.APITimeoutError):
        detail = "timed out"
    elif isinstance(exc, openai.APIConnectionError):
        detail = "connection failed"
    else:
        detail = str(exc)
    if target.api_key:
        detail = detail.replace(target.api_key, "[redacted]")
    detail = _KEY_LIKE.sub("[redacted]", detail)
    detail = _BEARER.sub(r"\1 [redacted]", detail)
    model = _bounded(target.model, _MODEL_CHARS)
    url = _bounded(public_url(target.base_url), _URL_CHARS)
    return ModelError(f"model {model} at {url}: {_bounded(detail, _DETAIL_CHARS)}")


async def empty_stream_error(
    client: openai.AsyncOpenAI, target: ModelTarget, request: dict[str, Any]
) -> ModelError:
    """Why a model stream ended without a single chunk, as a failure to report.

    llama-cpp-python answers a prompt over its context window with a 200 event
    stream that ends at once; the same request, not streamed and for one token,
    gets its reason (HTTP 400 "maximum context length is 4096 tokens. However,
    you requested 20031 tokens"). Without a reason, the failure says what was
    seen. Never an empty success."""
    probe = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
    probe.update(stream=False, max_tokens=1)
    probe.pop("max_completion_tokens", None)
    # Twice on a connection error: llama-cpp-python drops the connection its
    # empty stream came on, and the pool may hand that one out again.
    for _ in range(2):
        try:
            await client.chat.completions.create(**probe)
        except openai.APIStatusError as exc:
            return model_error(exc, target)
        except openai.APITimeoutError:
            break
        except openai.APIConnectionError:
            continue
        except openai.OpenAIError:
            pass
        break
    model = _bounded(target.model, _MODEL_CHARS)
    url = _bounded(public_url(target.base_url), _URL_CHARS)
    return ModelError(
        f"model {model} at {url}: the server ended its stream without any chunk "
        "(no answer, no finish_reason)"
    )
