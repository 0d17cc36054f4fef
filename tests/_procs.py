"""Process plumbing for the cross-process tests.

Every process a test starts goes through `spawn`, which puts it in its own
session (so the whole group can be killed), logs to a file, and registers it so
that teardown, an `atexit` hook and the pytest failure report can all find it.
Nothing here sleeps to assert: `wait_until` polls a predicate up to a deadline
and fails with the logs of the processes involved.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

ROOT = Path(__file__).resolve().parent.parent
GO_DIR = ROOT / "dispatcher_go"
PYTHON = str(ROOT / ".venv" / "bin" / "python")

T = TypeVar("T")

_LIVE: list[Proc] = []
_LIVE_LOCK = threading.Lock()

# Runs in front of every child: asks the kernel to SIGKILL it when pytest dies
# (PR_SET_PDEATHSIG survives exec), then execs the real program. This is not
# done with Popen(preexec_fn=...): preexec_fn forces a real fork(), which runs
# gRPC's atfork handlers, and those can deadlock while RPCs are in flight in
# other threads (seen here: pytest hung in __run_prefork_handlers). Without
# preexec_fn, CPython uses vfork() and no atfork handler runs.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(70)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Proc:
    """A child process started by a test, with its log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        launch = list(self.argv)
        # PDEATHSIG fires when the *thread* that started the child exits, so it
        # is only asked for from the main thread (fixtures and tests run there).
        if threading.current_thread() is threading.main_thread():
            launch = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *launch]
        self.popen = subprocess.Popen(
            launch,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
            start_new_session=True,
        )
        self.pid = self.popen.pid
        with _LIVE_LOCK:
            _LIVE.append(self)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} log={self.log_path}>"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Sends sig to this process only (not its group)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill9(self) -> None:
        """SIGKILL, like a crash: no cleanup runs in the process."""
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL the whole process group after `grace` seconds."""
        if self.alive():
            self.signal(signal.SIGCONT)  # a SIGSTOPped process cannot handle SIGTERM
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()

    def _kill_group(self) -> None:
        # The group id is the child's pid (start_new_session): this reaches only
        # processes this test started and their descendants.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
        with _LIVE_LOCK:
            if self in _LIVE:
                _LIVE.remove(self)

    def tail(self, lines: int = 40) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError as exc:
            return f"(no log: {exc})"
        text = data.decode("utf-8", "replace").splitlines()
        return "\n".join(text[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> Proc:
    """Starts argv with its output in log_dir/name.log."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    log_dir.mkdir(parents=True, exist_ok=True)
    return Proc(name, argv, log_dir / f"{name}.log", full_env)


def live_procs() -> list[Proc]:
    with _LIVE_LOCK:
        return list(_LIVE)


def kill_all() -> None:
    for p in live_procs():
        p._kill_group()


atexit.register(kill_all)


def logs_of(procs: Iterable[Proc], lines: int = 30) -> str:
    out = []
    for p in procs:
        state = "alive" if p.alive() else f"exited {p.popen.returncode}"
        out.append(f"--- {p.name} (pid {p.pid}, {state}) {p.log_path}\n{p.tail(lines)}")
    return "\n".join(out)


class Timeout(AssertionError):
    """A condition did not hold before its deadline."""


def wait_until(
    pred: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
    procs: Iterable[Proc] = (),
) -> T:
    """Polls pred until it returns a truthy value; returns it.

    Fails with `what`, the last exception pred raised and the log tails of procs.
    Fails early when one of procs exits.
    """
    procs = list(procs)
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise Timeout(f"{what}: process exited\n{logs_of(procs)}")
        if time.monotonic() >= deadline:
            raise Timeout(
                f"{what}: not true after {timeout:.1f}s (last error: {last_exc!r})\n"
                f"{logs_of(procs)}"
            )
        time.sleep(interval)


# ------------------------------------------------------------------ binaries

_BUILD_LOCK = threading.Lock()


def _newest_source_mtime() -> float:
    newest = 0.0
    for path in GO_DIR.rglob("*"):
        if path.suffix == ".go" or path.name in ("go.mod", "go.sum"):
            with contextlib.suppress(OSError):
                newest = max(newest, path.stat().st_mtime)
    return newest


def bin_dir() -> Path:
    return Path(os.environ.get("DISPATCH_BIN_DIR") or ROOT / "bin")


_BUILT: dict[str, Path] = {}


def ensure_binary(name: str) -> Path:
    """Returns bin_dir()/name, (re)building it with `go build` if missing or stale.

    Resolved once per test session, so every test runs the same binary even if
    the sources change meanwhile. With DISPATCH_BIN_DIR set (as `make test-e2e`
    does after `make build`), a binary found there is used as is.
    """
    with _BUILD_LOCK:
        if name in _BUILT:
            return _BUILT[name]
        target = bin_dir() / name
        overridden = bool(os.environ.get("DISPATCH_BIN_DIR"))
        fresh = target.exists() and (overridden or target.stat().st_mtime >= _newest_source_mtime())
        if not fresh:
            if not (GO_DIR / "cmd" / name).is_dir():
                raise FileNotFoundError(f"{target} is missing and there is no cmd/{name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename: a concurrent reader never sees
            # half a binary, and an interrupted build leaves the old one.
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            try:
                res = subprocess.run(
                    ["go", "build", "-o", str(tmp), f"./cmd/{name}"],
                    cwd=GO_DIR,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
                if res.returncode != 0:
                    raise RuntimeError(f"go build ./cmd/{name} failed:\n{res.stdout}\n{res.stderr}")
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        _BUILT[name] = target
        return target


# ------------------------------------------------------------------ addresses


def read_addr_file(path: Path) -> str | None:
    """Returns host:port once the file holds a complete address, else None."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return text


def health_status(addr: str, timeout: float = 1.0) -> int:
    """grpc.health.v1.Health/Check for the server (service ""); returns the enum value.

    The message is tiny, so it is encoded by hand instead of depending on
    grpcio-health-checking: the request is empty, the response is field 1 varint.
    """
    with grpc.insecure_channel(addr) as ch:
        call = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        raw: bytes = call(b"", timeout=timeout)
    if not raw:
        return 0  # UNKNOWN
    if raw[0] != 0x08:
        raise ValueError(f"unexpected health response {raw!r}")
    return raw[1]


HEALTH_SERVING = 1
