"""How to reach the dispatcher: address, credentials, KeepAlive, reconnect backoff.

Shared by the commander's slots and by tool providers. Every stream gets its own
channel with a local subchannel pool, i.e. its own HTTP/2 connection: a session
that floods its connection cannot hold back another slot's stop signal, and a
reconnect is fully paced by our own backoff, not by gRPC's internal one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import grpc
import grpc.aio
from anyio.abc import TaskStatus
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_exponential, wait_random

_log = logging.getLogger("commander.connection")

T = TypeVar("T")

#: Default dispatcher address.
DEFAULT_TARGET = "127.0.0.1:50051"

# KeepAlive (DESIGN.md "KeepAlive"): ping every 6 s even without calls, give the
# dispatcher 3 s to answer, so a frozen or black-holed dispatcher is found within
# 9 s and the slot moves on (re-attaching its session elsewhere) before a fleet's
# sweeper may end the task: with the default lease (10 s, renewed every third) and
# grace (5 s) a frozen replica's leases are taken over 11.7 s after the freeze at
# the earliest (docs/operations.md "Timing budget"). The dispatcher's
# EnforcementPolicy.MinTime is 3 s, so 6 s never trips ENHANCE_YOUR_CALM
# "too_many_pings". Without max_pings_without_data=0 the Python client stops
# pinging after two pings without data, and a long silent model call would go
# unguarded. gRPC C-core (1.85) times an unanswered ping out by
# grpc.http2.ping_timeout_ms (default 60 s), not by keepalive_timeout_ms alone:
# without it a frozen dispatcher was found only after 70 s
# (tests/test_failover.py::test_frozen_dispatcher_is_found_by_the_commanders_keepalive).
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 6_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.http2.ping_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

#: The dispatcher's default message size limit; packets are checked against it
#: before they are written, so an oversized artifact fails alone instead of
#: ending the slot's stream with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def now_us() -> int:
    """Unix time in microseconds (the ``timestamp`` of upstream packets)."""
    return time.time_ns() // 1_000


@dataclasses.dataclass(frozen=True)
class ConnectionConfig:
    """Where the dispatcher is and how to authenticate to it.

    ``token`` is sent as ``authorization: Bearer <token>`` metadata on every
    stream. TLS is used when ``root_certificates`` is given (PEM bytes of the CA
    that signed the dispatcher's certificate) or ``tls`` is true (system roots).
    """

    target: str = DEFAULT_TARGET
    token: str | None = dataclasses.field(default=None, repr=False)
    root_certificates: bytes | None = dataclasses.field(default=None, repr=False)
    tls: bool = False
    #: First reconnect delay, in seconds; doubles per failed attempt, with jitter.
    reconnect_initial: float = 0.5
    #: Upper bound of the reconnect delay, in seconds.
    reconnect_max: float = 10.0
    #: How long to wait for the dispatcher's answer to our hello.
    handshake_timeout: float = 10.0
    #: Extra channel options, appended after the KeepAlive ones.
    channel_options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_args(
        cls,
        target: str,
        *,
        token: str | None = None,
        ca_cert: str | Path | None = None,
    ) -> ConnectionConfig:
        """Build a config the way the command-line tools do (CA given as a file path)."""
        root = Path(ca_cert).read_bytes() if ca_cert else None
        return cls(target=target, token=token or None, root_certificates=root)

    @property
    def targets(self) -> tuple[str, ...]:
        """The dispatcher addresses (``target`` split at commas)."""
        found = tuple(t.strip() for t in self.target.split(",") if t.strip())
        return found or (DEFAULT_TARGET,)

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls or self.root_certificates is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, when one is configured."""
        if not self.token:
            return ()
        return (("authorization", f"Bearer {self.token}"),)

    def create_channel(self, target: str | None = None) -> grpc.aio.Channel:
        """A fresh channel with its own connection (see the module doc) to ``target``
        (default: the first of :attr:`targets`)."""
        target = target or self.targets[0]
        options = [
            *KEEPALIVE_OPTIONS,
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            *self.channel_options,
        ]
        if self.secure:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
            return grpc.aio.secure_channel(target, credentials, options=options)
        return grpc.aio.insecure_channel(target, options=options)


class ConnectFailed(Exception):
    """One connection attempt failed before the stream became healthy (internal).

    ``refused_for_now``: the dispatcher answered the hello "not now, try again"
    (a re-attach it could not decide): the next attempts back off more.
    """

    def __init__(self, reason: str, *, refused_for_now: bool = False) -> None:
        super().__init__(reason)
        self.refused_for_now = refused_for_now


#: How many times ``reconnect_initial`` the delay after refusals for now grows to
#: (capped by ``reconnect_max``): 4 s by default.
REFUSED_FOR_NOW_MAX_FACTOR = 8


def urgent_delay(config: ConnectionConfig, refused: int) -> float:
    """The reconnect delay, before jitter, of a slot whose session waits to re-attach,
    after a refusal for now, the ``refused``-th since its last healthy stream.

    ``reconnect_initial`` after the first; then it doubles per refusal up to
    ``REFUSED_FOR_NOW_MAX_FACTOR`` times ``reconnect_initial`` (capped by
    ``reconnect_max``): a dispatcher whose database does not answer is not asked
    again every second by every waiting session.
    """
    initial = config.reconnect_initial
    cap = max(initial, min(config.reconnect_max, REFUSED_FOR_NOW_MAX_FACTOR * initial))
    return float(min(cap, initial * 2 ** (refused - 1)))


async def reconnect_forever(
    config: ConnectionConfig,
    attempt: Callable[[], Awaitable[bool]],
    *,
    name: str,
    should_stop: Callable[[], bool],
    urgent: Callable[[], bool] | None = None,
) -> None:
    """Run ``attempt`` again and again until ``should_stop()``.

    ``attempt`` raises :class:`ConnectFailed` when it could not get a healthy
    stream (dispatcher down, refused, handshake timeout): the next attempt
    waits with exponential backoff and jitter. It returns ``True`` when a
    stream that had been healthy ended: the backoff starts over, so a
    dispatcher restart after a week of uptime is noticed within
    ``reconnect_initial`` (jittered, so that all commanders do not reconnect in
    the same instant), not after the maximum delay. While ``urgent()`` is true
    (a session waits to re-attach) the delay is at most ``reconnect_initial``
    plus jitter (a dispatcher back after a restart is found within it), but
    after a refusal for now it is :func:`urgent_delay`, growing with each
    refusal since the last healthy stream. Another failure in between (an
    address that is down) is followed by the short delay and does not reset
    the count: with several addresses, the refusing dispatcher is still asked
    less often each time, and a dead one is passed quickly.
    """

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        _log.warning(
            "%s: connection attempt %d failed (%s); retrying in %.2fs",
            name,
            state.attempt_number,
            exc,
            delay,
        )

    backoff = wait_exponential(multiplier=config.reconnect_initial, max=config.reconnect_max)
    jitter = wait_random(0, config.reconnect_initial)

    while not should_stop():
        refused = 0  # refusals for now since the last healthy stream

        def wait(state: RetryCallState) -> float:
            nonlocal refused
            exc = state.outcome.exception() if state.outcome else None
            delay = backoff(state)
            if urgent is not None and urgent():
                if isinstance(exc, ConnectFailed) and exc.refused_for_now:
                    refused += 1
                    delay = min(delay, urgent_delay(config, refused))
                else:
                    delay = min(delay, config.reconnect_initial)
            return float(delay + jitter(state))

        retrying = AsyncRetrying(
            # initial * 2**n, capped, plus up to `initial` of jitter.
            wait=wait,
            retry=retry_if_exception_type(ConnectFailed),
            sleep=anyio.sleep,
            before_sleep=log_retry,
            reraise=True,
        )
        await retrying(attempt)
        if should_stop():
            return
        await anyio.sleep(random.uniform(0.0, config.reconnect_initial))


async def close_channel(channel: grpc.aio.Channel, bound: float = 2.0) -> None:
    """Close a channel under a shielded, time-bounded scope (safe while cancelled)."""
    with anyio.move_on_after(bound, shield=True):
        await channel.close(grace=None)


class CallCancelled(Exception):
    """grpc.aio raised CancelledError for a call that was cancelled, not for our task."""


async def call_op(operation: Awaitable[T]) -> T:
    """Await one operation of a grpc.aio call (read, write, done_writing).

    grpc.aio sometimes raises a CancelledError of its own — e.g. a read that
    was waiting for the call's preparation when the call got cancelled. anyio
    does not recognise it as its cancellation, so it would escape every cancel
    scope and silently end whatever task it reaches. Here a real cancellation
    (our scope is cancelled) is re-raised the way anyio expects; anything else
    becomes :class:`CallCancelled`, an ordinary error of that stream.
    """
    try:
        return await operation
    except asyncio.CancelledError:
        if anyio.current_effective_deadline() == -math.inf:
            await anyio.lowlevel.checkpoint()  # raises anyio's own cancellation
            raise
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # a native Task.cancel(): not ours to swallow
        raise CallCancelled("the call was cancelled") from None


class CallTimer:
    """Cancels a gRPC call when its time is up.

    Bounding a grpc.aio read with an anyio scope is not reliable: while the
    call is still being prepared (the server has sent no headers yet), grpc.aio
    may swallow the cancellation and go on waiting. ``call.cancel()`` always
    ends pending reads and writes, so timeouts and teardowns go through it.
    """

    def __init__(self, call: Any, delay: float) -> None:
        self._call = call
        self._delay = delay
        self._scope: anyio.CancelScope | None = None
        #: True once the time ran out and the call was cancelled.
        self.expired = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start with ``await task_group.start(timer.run)``."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            await anyio.sleep(self._delay)
            self.expired = True
            self._call.cancel()

    def disarm(self) -> None:
        if self._scope is not None:
            self._scope.cancel()


def describe_error(exc: BaseException, on_timeout: str) -> str:
    """Why a stream failed, in one line (gRPC status code and details)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details() or ""
        return f"{exc.code().name}: {details}" if details else exc.code().name
    if isinstance(exc, TimeoutError):
        return on_timeout
    return str(exc) or type(exc).__name__


def open_stream(method: Any, config: ConnectionConfig) -> Any:
    """Open a bidi stream with the config's metadata.

    grpc.aio's ``call.read()`` returns the response message or the ``EOF``
    sentinel; callers tell them apart with ``isinstance`` on the message type.
    Typed loosely: grpc's typing stubs lag the aio API (optional request iterator).
    """
    return method(metadata=config.metadata())
