"""OpenTelemetry tracing: one trace per task across the dispatcher and the commander.

The dispatcher sends its session span's W3C Trace Context in the start packet
(``StartSession.trace_context``); the commander's ``session`` span is its child,
and the spans of the session's work (model calls, tool calls) are children of
that. A tool call carries its span's context back in
``ToolCallRequest.trace_context``, so the dispatcher's ``execute_tool`` span is
the child of the commander's ``tool_call`` span: the context crosses the gRPC
hop both ways inside the packets of the one long-lived ChatStream.

Exporting is off by default. ``OTEL_TRACES_EXPORTER=otlp`` turns it on: spans go
by OTLP/gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default ``localhost:4317``), and
the SDK reads the other standard variables (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_EXPORTER_OTLP_HEADERS``, ...). With exporting off the spans are no-ops,
but a context received from the dispatcher is still passed on with tool calls,
so the dispatcher's spans of one task stay in one trace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

__all__ = ["TRACER", "end_model_span", "extract", "inject", "model_span", "setup_tracing"]

_log = logging.getLogger(__name__)

#: The commander's tracer. A proxy: it follows the provider set by setup_tracing.
TRACER = trace.get_tracer("commander")


class TracingConfigError(ValueError):
    """The OTEL_* environment asks for something the commander cannot do."""


def setup_tracing(
    service_name: str, version: str, environ: Mapping[str, str] | None = None
) -> Callable[[], None]:
    """Enable exporting if the environment asks for it; returns the shutdown (flush).

    Raises TracingConfigError for an exporter or protocol we do not support.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return _nothing
    exporters = [
        e.strip().lower()
        for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")
        if e.strip() and e.strip().lower() != "none"
    ]
    if not exporters:
        return _nothing  # the default: off
    if exporters != ["otlp"]:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={env.get('OTEL_TRACES_EXPORTER')!r}: "
            "only otlp (or none) is supported"
        )
    # An empty variable counts as unset (templates often set ${VAR:-}).
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol != "grpc":
        raise TracingConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: the commander exports OTLP over grpc"
        )
    # Imported only when used: the SDK starts no thread and opens no channel otherwise.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, str] = {"service.version": version}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name  # OTEL_SERVICE_NAME wins
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _log.info("tracing: exporting spans by OTLP/gRPC")
    return provider.shutdown


def _nothing() -> None:
    return None


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context of a packet's ``trace_context`` map (empty map: no parent)."""
    return propagate.extract(dict(carrier))


def inject() -> dict[str, str]:
    """The current span's context as a packet's ``trace_context`` map ({} if none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


class _Usage(Protocol):
    prompt_tokens: int
    completion_tokens: int


def model_span(model: str, base_url: str) -> trace.Span:
    """A started span for one streamed model call (GenAI semantic conventions).

    Not made current: planners stream from async generators, whose consumers
    must not run inside it. End it with :func:`end_model_span`.
    """
    return TRACER.start_span(
        f"chat {model}",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "server.address": base_url,
        },
    )


def end_model_span(span: trace.Span, usage: _Usage | None, *, completed: bool) -> None:
    """Ends a model call's span with its token usage and whether it ran to its end."""
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
    span.set_attribute("gen_ai.response.completed", completed)
    span.end()
