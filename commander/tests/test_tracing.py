"""The OTEL_* environment handling of commander._tracing (the cross-process trace
tree is tested in tests/test_tracing.py)."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from commander._tracing import TracingConfigError, extract, inject, setup_tracing


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": ""},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"},
    ],
)
def test_off_by_default(env: dict[str, str]) -> None:
    before = trace.get_tracer_provider()
    shutdown = setup_tracing("commander", "t", env)
    shutdown()
    assert trace.get_tracer_provider() is before


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp,console"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
    ],
)
def test_what_it_cannot_do_is_refused_by_name(env: dict[str, str]) -> None:
    with pytest.raises(TracingConfigError, match="OTEL_"):
        setup_tracing("commander", "t", env)


def test_an_empty_protocol_means_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    # Compose and Kubernetes templates often set ${VAR:-}; the dispatcher agrees.
    installed: list[object] = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    shutdown = setup_tracing(
        "commander",
        "t",
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
        },
    )
    shutdown()
    assert len(installed) == 1


def test_context_round_trip_and_garbage() -> None:
    parent = {"traceparent": "00-0102030405060708090a0b0c0d0e0f10-0102030405060708-01"}
    ctx = extract(parent)
    span_ctx = trace.get_current_span(ctx).get_span_context()
    assert span_ctx.trace_id == 0x0102030405060708090A0B0C0D0E0F10 and span_ctx.is_remote
    garbage = extract({"traceparent": "garbage"})
    assert not trace.get_current_span(garbage).get_span_context().is_valid
    assert inject() == {}  # no current span: nothing to send
