"""scripts/fleet.sh up: one that fails partway stops what it started, and
only that (a fleet already up, a PostgreSQL running before it, stay)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLEET = ROOT / "scripts" / "fleet.sh"
POSTGRES = ROOT / "scripts" / "postgres.sh"

pytestmark = pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "python").exists(),
    reason="needs the venv (fleet.sh runs its python)",
)


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    # Not pytest's tmp_path: PostgreSQL runs as its own user, which must
    # reach the state dir.
    tmp_path = Path(tempfile.mkdtemp(prefix="fleetsh-", dir="/tmp"))
    tmp_path.chmod(0o755)
    e = dict(os.environ)
    e.update(
        FLEET_RUN_DIR=str(tmp_path / "run"),
        PG_STATE_DIR=str(tmp_path / "pg"),
        REDIS_STATE_DIR=str(tmp_path / "redis"),
    )
    yield e
    subprocess.run(
        [str(ROOT / "scripts" / "redis.sh"), "stop"], env=e, check=False, capture_output=True
    )
    subprocess.run([str(POSTGRES), "stop"], env=e, check=False, capture_output=True)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def taken_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLEET), "up"], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def pg_running(env: dict[str, str]) -> bool:
    return (
        subprocess.run([str(POSTGRES), "dsn"], env=env, capture_output=True, check=False).returncode
        == 0
    )


def test_failed_up_stops_the_postgresql_and_redis_it_started(
    env: dict[str, str], taken_port: int
) -> None:
    env["MODEL_PORT"] = str(taken_port)
    r = up(env)
    assert r.returncode != 0 and "is taken" in r.stderr, r.stderr
    # Both were left running (and, later in an up, the model and replicas).
    assert not Path(env["PG_STATE_DIR"]).exists(), r.stderr
    assert not Path(env["REDIS_STATE_DIR"]).exists(), r.stderr


def test_failed_up_leaves_a_postgresql_running_before_it(
    env: dict[str, str], taken_port: int
) -> None:
    subprocess.run([str(POSTGRES), "start"], env=env, check=True, capture_output=True)
    env["MODEL_PORT"] = str(taken_port)
    r = up(env)
    assert r.returncode != 0, r.stderr
    assert pg_running(env), "a failed up stopped a PostgreSQL it had not started"
    assert not Path(env["REDIS_STATE_DIR"]).exists(), r.stderr


def test_up_refuses_while_a_fleet_is_up_and_stops_nothing(env: dict[str, str]) -> None:
    run = Path(env["FLEET_RUN_DIR"])
    run.mkdir(parents=True)
    first = subprocess.Popen(["sleep", "60"])
    try:
        (run / "dispatcher-1.pid").write_text(f"{first.pid}\n")
        r = up(env)
        assert r.returncode != 0 and "a fleet is up already" in r.stderr, r.stderr
        assert first.poll() is None, "the first fleet's process was stopped"
        assert (run / "dispatcher-1.pid").read_text().strip() == str(first.pid)
        assert not Path(env["PG_STATE_DIR"]).exists(), "PostgreSQL was started"
    finally:
        first.kill()
        first.wait()


def test_failed_up_stops_the_processes_it_started(env: dict[str, str], taken_port: int) -> None:
    # The model starts, then replica-1's port is taken.
    env["FLEET_GRPC_PORT"] = str(taken_port)
    env["MODEL_PORT"] = str(free_port())
    r = up(env)
    assert r.returncode != 0 and "is taken" in r.stderr and "model server" in r.stderr, r.stderr
    run = Path(env["FLEET_RUN_DIR"])
    assert not (run / "model.pid").exists(), r.stderr
    pid = int(next(line for line in r.stderr.splitlines() if "model pid" in line).split()[-1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
