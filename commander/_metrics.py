"""Prometheus metrics of the commander (optional: ``ENABLE_PROMETHEUS=true``).

Nothing is recorded until :func:`install` is called (the ``commander`` command
does it when metrics are enabled); the hooks in the hot paths then cost one
global read and, for labelled metrics, a dict lookup of a cached child.
Tests install :class:`CommanderMetrics` on a private ``CollectorRegistry``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

_log = logging.getLogger("commander.metrics")

#: Model latencies: time to first token and step durations reach minutes.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_ACTION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CommanderMetrics:
    """The commander's metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.model_tokens = Counter(
            "commander_model_tokens",
            "Model tokens, by model and direction (input or output).",
            ["model", "direction"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "commander_model_time_to_first_token_seconds",
            "Seconds from sending a model request to its first streamed chunk.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.step_duration = Histogram(
            "commander_step_duration_seconds",
            "Seconds of one planner step: a model turn (chat), a GUI step (gui).",
            ["planner"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.sandbox_action_duration = Histogram(
            "commander_sandbox_action_duration_seconds",
            "Seconds of one sandbox action request, by action and outcome (ok or error).",
            ["action", "outcome"],
            buckets=_ACTION_BUCKETS,
            registry=registry,
        )
        self.sessions = Counter(
            "commander_sessions",
            "Finished sessions, by planner and outcome (success, failure, stopped).",
            ["planner", "outcome"],
            registry=registry,
        )
        self.slots_connected = Gauge(
            "commander_slots_connected",
            "Slots whose ChatStream is connected (hello acknowledged).",
            registry=registry,
        )
        # Labelled children, cached: labels() builds a tuple and takes a lock.
        self._tokens: dict[str, tuple[Any, Any]] = {}
        self._ttft: dict[str, Any] = {}
        self._steps: dict[str, Any] = {}
        self._actions: dict[tuple[str, str], Any] = {}

    def add_tokens(self, model: str, input_tokens: int, output_tokens: int) -> None:
        children = self._tokens.get(model)
        if children is None:
            children = (
                self.model_tokens.labels(model=model, direction="input"),
                self.model_tokens.labels(model=model, direction="output"),
            )
            self._tokens[model] = children
        if input_tokens > 0:
            children[0].inc(input_tokens)
        if output_tokens > 0:
            children[1].inc(output_tokens)

    def observe_first_token(self, model: str, seconds: float) -> None:
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = self.time_to_first_token.labels(model=model)
        child.observe(seconds)

    def observe_step(self, planner: str, seconds: float) -> None:
        child = self._steps.get(planner)
        if child is None:
            child = self._steps[planner] = self.step_duration.labels(planner=planner)
        child.observe(seconds)

    def observe_action(self, action: str, outcome: str, seconds: float) -> None:
        key = (action, outcome)
        child = self._actions.get(key)
        if child is None:
            child = self._actions[key] = self.sandbox_action_duration.labels(
                action=action, outcome=outcome
            )
        child.observe(seconds)

    def session_finished(self, planner: str, outcome: str) -> None:
        self.sessions.labels(planner=planner, outcome=outcome).inc()

    def slot_connected(self, delta: int) -> None:
        self.slots_connected.inc(delta)


#: The installed metrics, or None (the default: nothing is recorded).
current: CommanderMetrics | None = None


def install(metrics: CommanderMetrics | None) -> CommanderMetrics | None:
    """Make ``metrics`` the recorded-to instance (None: stop recording); returns the previous."""
    global current
    previous, current = current, metrics
    return previous


def serve(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` of ``registry`` on ``host:port`` in a daemon thread.

    Returns prometheus_client's (server, thread); ``server.shutdown()`` stops it.
    """
    server, thread = start_http_server(
        port, addr=host, registry=REGISTRY if registry is None else registry
    )
    _log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
