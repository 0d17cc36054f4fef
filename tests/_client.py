"""Client-side helpers: event watchers running in threads and a raw ChatStream slot."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from commander._gen.dispatch.v1 import (
    interaction_pb2,
    interaction_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)
from commander._gen.lybic.agent import agent_pb2, agent_pb2_grpc
from tests._procs import Timeout

TERMINAL = (agent_pb2.SUCCESS, agent_pb2.FAILURE, agent_pb2.CANCELLED)
CONTENT_KINDS = ("content", "thought")
CONTENT_STAGES = ("content", "thought")


def kind(ev: tasks_pb2.TaskEvent) -> str:
    return ev.WhichOneof("kind") or ""


def status_name(status: int) -> str:
    return agent_pb2.TaskStatus.Name(status)


def describe(events: Sequence[tasks_pb2.TaskEvent]) -> str:
    """One line per event, for assertion messages."""
    lines = []
    for ev in events:
        k = kind(ev)
        body = getattr(ev, k) if k else None
        text = str(body).replace("\n", " ")[:120] if body is not None else ""
        lines.append(f"  #{ev.seq} {k}: {text}")
    return "\n".join(lines)


def watch_all(
    tasks: tasks_pb2_grpc.TaskServiceStub, task_id: str, after_seq: int = 0, timeout: float = 30
) -> list[tasks_pb2.TaskEvent]:
    """WatchTask until the server ends the stream (after the terminal event)."""
    req = tasks_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq)
    return [r.event for r in tasks.WatchTask(req, timeout=timeout)]


def wait_status(
    agent: agent_pb2_grpc.AgentStub,
    task_id: str,
    statuses: Sequence[int] = TERMINAL,
    timeout: float = 30,
) -> agent_pb2.QueryTaskStatusResponse:
    """Polls QueryTaskStatus until the status is one of statuses."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = agent.QueryTaskStatus(agent_pb2.QueryTaskStatusRequest(taskId=task_id), timeout=5)
        if last.status in statuses:
            return last
        time.sleep(0.05)
    want = [status_name(s) for s in statuses]
    raise Timeout(f"task {task_id} not in {want} after {timeout}s; last: {last}")


@dataclass
class _Stream:
    """Items received by a streaming call in a thread, with their receive times."""

    items: list[tuple[float, Any]] = field(default_factory=list)
    error: grpc.RpcError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[tuple[float, Any]]:
        with self.lock:
            return list(self.items)

    def values(self) -> list[Any]:
        return [v for _, v in self.snapshot()]

    def wait(self, pred: Callable[[list[Any]], bool], timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            vals = self.values()
            if pred(vals):
                return vals
            if self.done.is_set():
                raise Timeout(f"{what}: stream ended first (error={self.error!r}); got {len(vals)}")
            if time.monotonic() >= deadline:
                raise Timeout(f"{what}: not true after {timeout}s; got {len(vals)} items")
            time.sleep(0.02)

    def join(self, timeout: float) -> None:
        if not self.done.wait(timeout):
            raise Timeout(f"stream did not end within {timeout}s")


def _pump(call: Iterator[Any], out: _Stream, unwrap: Callable[[Any], Any]) -> None:
    try:
        for item in call:
            with out.lock:
                out.items.append((time.monotonic(), unwrap(item)))
    except grpc.RpcError as exc:
        out.error = exc
    finally:
        out.done.set()


def start_watch(
    tasks: tasks_pb2_grpc.TaskServiceStub, task_id: str, after_seq: int = 0, timeout: float = 60
) -> _Stream:
    """WatchTask in a background thread; items are TaskEvents."""
    call = tasks.WatchTask(
        tasks_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq), timeout=timeout
    )
    out = _Stream()
    threading.Thread(target=_pump, args=(call, out, lambda r: r.event), daemon=True).start()
    return out


def start_task_stream(
    agent: agent_pb2_grpc.AgentStub, task_id: str, timeout: float = 60
) -> _Stream:
    """GetAgentTaskStream in a background thread; items are TaskStream messages."""
    call = agent.GetAgentTaskStream(
        agent_pb2.GetAgentTaskStreamRequest(taskId=task_id), timeout=timeout
    )
    out = _Stream()
    threading.Thread(target=_pump, args=(call, out, lambda r: r.taskStream), daemon=True).start()
    return out


# ------------------------------------------------------------------ raw ChatStream


class StreamEnded(AssertionError):
    """The ChatStream ended while a packet was expected."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None):
        super().__init__(f"ChatStream ended: {code} {details}")
        self.code = code
        self.details = details


_END = object()


class _RawStream:
    """A hand-driven bidi stream: the test plays the other side, message by message."""

    def __init__(self, method: Callable[..., Any], metadata: Sequence[tuple[str, str]] | None):
        self._out: queue.Queue[Any] = queue.Queue()
        self._in: queue.Queue[Any] = queue.Queue()
        self.call = method(self._requests(), metadata=metadata)
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self._ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[Any]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for msg in self.call:
                self._in.put(msg)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code = exc.code()
            self.details = exc.details()
        finally:
            self._ended.set()
            self._in.put(_END)

    def send(self, msg: Any) -> None:
        self._out.put(msg)

    def recv(self, timeout: float = 10) -> Any:
        try:
            item = self._in.get(timeout=timeout)
        except queue.Empty:
            raise Timeout(f"nothing received within {timeout}s") from None
        if item is _END:
            self._in.put(_END)
            raise StreamEnded(self.code, self.details)
        return item

    def recv_until(self, pred: Callable[[Any], bool], timeout: float = 10) -> Any:
        """Receives until a message matches pred (others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"no matching message within {timeout}s")
            msg = self.recv(left)
            if pred(msg):
                return msg

    def wait_end(self, timeout: float = 10) -> grpc.StatusCode | None:
        """Waits for the server to end the stream; returns its status code."""
        if not self._ended.wait(timeout):
            raise Timeout(f"stream not ended by the server within {timeout}s")
        return self.code

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()


class RawSlot(_RawStream):
    """A hand-driven ChatStream: the test plays the commander, packet by packet."""

    def __init__(self, channel: grpc.Channel, metadata: Sequence[tuple[str, str]] | None = None):
        stub = interaction_pb2_grpc.AgentInteractionStub(channel)
        super().__init__(stub.ChatStream, metadata)

    def send(self, msg: interaction_pb2.UpstreamPacket) -> None:
        if not msg.timestamp:
            msg.timestamp = int(time.time() * 1e6)
        super().send(msg)

    def hello(self, capabilities: Sequence[str], commander_id: str = "raw-test") -> str:
        """Sends hello and returns the slot id from the HELLO ack."""
        self.send(
            interaction_pb2.UpstreamPacket(
                hello=interaction_pb2.Hello(
                    commander_id=commander_id, version="test", capabilities=list(capabilities)
                )
            )
        )
        ack = self.recv()
        assert ack.WhichOneof("signal") == "ack", ack
        assert ack.ack.kind == interaction_pb2.ACK_KIND_HELLO, ack
        return ack.ack.slot_id

    def take_task(
        self, tasks: tasks_pb2_grpc.TaskServiceStub, instruction: str, planner: str
    ) -> tuple[str, interaction_pb2.DownstreamPacket]:
        """Submits a task for `planner` (this slot's) and returns its id and the start
        signal the slot got for it."""
        task_id = tasks.SubmitTask(
            tasks_pb2.SubmitTaskRequest(instruction=instruction, planner=planner), timeout=5
        ).task_id
        start = self.recv_until(lambda p: p.WhichOneof("signal") == "start", 10)
        return task_id, start


class RawProvider(_RawStream):
    """A hand-driven ToolProviderService.Connect stream: the test plays a provider."""

    def __init__(self, channel: grpc.Channel, metadata: Sequence[tuple[str, str]] | None = None):
        stub = tools_pb2_grpc.ToolProviderServiceStub(channel)
        super().__init__(stub.Connect, metadata)

    def hello(self, provider_id: str, tools: Sequence[interaction_pb2.ToolSpec]) -> list[str]:
        """Sends hello; returns the registered tool names from the welcome."""
        self.send(
            tools_pb2.ConnectRequest(
                hello=tools_pb2.ProviderHello(provider_id=provider_id, tools=list(tools))
            )
        )
        msg = self.recv()
        assert msg.WhichOneof("msg") == "welcome", msg
        return list(msg.welcome.registered_tools)
