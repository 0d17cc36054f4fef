"""Seed 003's byclaw workers as commanders: a bridge over the SDK's Redis Streams.

A worker written against ``byclaw-gateway-sdk`` 0.1.1 (a ``GatewayWorker`` with
``get_capabilities`` / ``process_command``) runs unmodified as its own process,
in its own Python 3.12+ venv (``.venv-byclaw``, ``make setup-byclaw``). This
package speaks that SDK's Redis Streams format from our commander (Python 3.11):
each worker capability becomes a planner (slot capability ``planner:<cap>``),
a task becomes an ``ASK_AGENT`` command, the worker's chunks / states /
artifacts become our events, our stop becomes the SDK's ``CANCEL_TASK``.

Run it as ``python -m commander.byclaw --redis URL --dispatcher ADDR``.

This package owns the translation and the containment of the SDK's faults
(a worker that dies mid-task, entries it never acks). It must not import
``byclaw_gateway_sdk`` nor change what the workers do; the wire format is in
``_protocol`` (pure data), the Redis I/O in ``_bridge``.
"""

from commander.byclaw._bridge import (
    ByclawBridge,
    ByclawError,
    ByclawNoWorkerError,
    ByclawPlanner,
    ByclawSettings,
    ByclawTaskFailedError,
    ByclawWorkerLostError,
    discover_capabilities,
    live_workers,
    sweep_malformed,
)

__all__ = [
    "ByclawBridge",
    "ByclawError",
    "ByclawNoWorkerError",
    "ByclawPlanner",
    "ByclawSettings",
    "ByclawTaskFailedError",
    "ByclawWorkerLostError",
    "discover_capabilities",
    "live_workers",
    "sweep_malformed",
]
