"""`ops/stack`: a repeated `up` changes nothing, and a failed `up` says why and cleans up.

The failure cases run a second, separate instance of the stack (its own state folder and
ports, from SB_STACK_DIR and SB_STACK_*_PORT), so the shared stack other tests use is never
touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "ops" / "stack"
PORT_SETTINGS = (
    "SB_STACK_PG_PORT",
    "SB_STACK_REDIS_PORT",
    "SB_STACK_S3_PORT",
    "SB_STACK_KAFKA_PORT",
    "SB_STACK_CONTROLLER_PORT",
    "SB_STACK_CONNECT_PORT",
)


def run_stack(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STACK), *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def instance() -> Iterator[dict[str, str]]:
    """The environment of a second stack instance on free ports; stopped and removed after."""
    # Below the repository's .stack/ rather than the temp folder: PostgreSQL runs as its own
    # user, who must be able to reach its data folder.
    state = ROOT / ".stack" / "instances" / uuid.uuid4().hex[:8]
    env = dict(os.environ)
    env.update({name: str(free_port()) for name in PORT_SETTINGS})
    env["SB_STACK_DIR"] = str(state)
    env["SB_STACK_LIB_DIR"] = str(ROOT / ".stack" / "lib")
    yield env
    run_stack("down", env=env)
    shutil.rmtree(state, ignore_errors=True)


def test_second_up_is_idempotent(stack: None) -> None:
    before = run_stack("status")

    again = run_stack("up")

    assert again.returncode == 0, again.stderr
    service_lines = [line for line in again.stdout.splitlines() if line.split()[:1] != ["schema"]]
    assert "started" not in again.stdout, again.stdout
    assert all(" running " in line for line in service_lines), again.stdout
    after = run_stack("status")
    assert after.returncode == 0, after.stdout
    assert after.stdout == before.stdout


def test_up_names_a_taken_port_and_starts_nothing(instance: dict[str, str]) -> None:
    redis_port = int(instance["SB_STACK_REDIS_PORT"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", redis_port))
        squatter.listen()

        result = run_stack("up", "postgres", "redis", env=instance)

    assert result.returncode != 0
    assert "redis" in result.stderr
    assert f"port {redis_port}" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr
    assert "SB_STACK_REDIS_PORT" in result.stderr
    assert not port_open(int(instance["SB_STACK_PG_PORT"])), "postgres was left running"
    assert "started" not in result.stdout


def test_failed_up_stops_what_it_started(instance: dict[str, str]) -> None:
    instance["SB_STACK_JAVA"] = str(Path(instance["SB_STACK_DIR"]) / "no-such-java")

    result = run_stack("up", "postgres", "redis", "kafka", env=instance)

    assert result.returncode != 0
    assert "kafka" in result.stderr and "Java missing" in result.stderr
    assert "postgres   started" in result.stdout and "redis      started" in result.stdout
    assert not port_open(int(instance["SB_STACK_PG_PORT"])), "postgres was left running"
    assert not port_open(int(instance["SB_STACK_REDIS_PORT"])), "redis was left running"
    status = run_stack("status", env=instance)
    assert "running" not in status.stdout
