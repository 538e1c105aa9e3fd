"""``storage-builder demo ...`` as a user runs it: a real process against the real database."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import typer
from typer.testing import CliRunner

from schemas.demo import register

_CLI = [sys.executable, "-c", "from storage_builder.cli import main; main()"]


def _run(demo_config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_CLI, "--config", str(demo_config), "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["churn", "--rate", "-1"], "--rate"),
        (["churn", "--rate", "5", "--clients", "abc"], "--clients"),
        (["churn", "--rate", "5", "--datasets", "ledger"], "--datasets"),
        (["seed", "--client-ids", "1x"], "--client-ids"),
        (["seed", "--first-client", "0"], "--first-client"),
        (["seed", "--datasets", "raw_data,ledger"], "--datasets"),
        (["seed", "--rows-per-client", "-3"], "--rows-per-client"),
        (["seed", "--skew", "-1"], "--skew"),
    ],
)
def test_bad_arguments_name_the_option(args: list[str], option: str) -> None:
    # In-process: the arguments are refused before any setting or service is needed.
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)

    result = CliRunner().invoke(app, ["demo", *args])

    assert result.exit_code == 2
    assert option in result.output


def test_seed_then_churn(
    source: psycopg.Connection, demo_config: Path, client_id: int, tmp_path: Path
) -> None:
    changes = tmp_path / "changes.jsonl"

    seeded = _run(
        demo_config,
        "seed",
        "--client-ids",
        str(client_id),
        "--rows-per-client",
        "40",
        "--datasets",
        "raw_data,formulas",
        "--no-vacuum",
        "--json",
    )
    churned = _run(
        demo_config,
        "churn",
        "--clients",
        str(client_id),
        "--datasets",
        "raw_data",
        "--rate",
        "30",
        "--duration",
        "2",
        "--log-changes",
        str(changes),
        "--json",
    )

    assert seeded.returncode == 0, seeded.stderr
    assert json.loads(seeded.stdout)["rows"] == {"raw_data": 40, "formulas": 40}
    assert churned.returncode == 0, churned.stderr
    totals = json.loads(churned.stdout)
    logged = [json.loads(line) for line in changes.read_text().splitlines()]
    assert totals["changes"] == len(logged) > 0
    assert totals["inserts"] == sum(change["op"] == "c" for change in logged)
    assert {(c["dataset"], c["client_id"]) for c in logged} == {("raw_data", client_id)}


def test_churn_stops_cleanly_on_sigterm(
    source: psycopg.Connection, demo_config: Path, client_id: int, tmp_path: Path
) -> None:
    changes = tmp_path / "changes.jsonl"
    assert (
        _run(
            demo_config,
            "seed",
            "--client-ids",
            str(client_id),
            "--rows-per-client",
            "5",
            "--no-vacuum",
        ).returncode
        == 0
    )
    process = subprocess.Popen(
        [
            *_CLI,
            "--config",
            str(demo_config),
            "demo",
            "churn",
            "--clients",
            str(client_id),
            "--rate",
            "50",
            "--log-changes",
            str(changes),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (changes.exists() and changes.stat().st_size):
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 0, err
    inserts = sum(json.loads(line)["op"] == "c" for line in changes.read_text().splitlines())
    assert f"committed {inserts} inserts" in out
