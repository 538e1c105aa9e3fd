"""`storage-builder reconcile` as a scheduler runs it: exit codes, the JSON report, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
from reconcile_helpers import ROWS, assert_snapshot_equals_database, change_rows

from schemas.datasets import Target
from storage_builder.settings import Settings


def _reconcile(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    main = "from storage_builder.cli import main; main()"
    command = [sys.executable, "-c", main, "--config", str(config_file)]
    return subprocess.run(
        [*command, "reconcile", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_drift_exits_3_then_in_sync_exits_0_with_a_json_report(
    bootstrapped: Target,
    pg: psycopg.Connection,
    config_file: Path,
    small_settings: Settings,
    tmp_path: Path,
) -> None:
    change_rows(pg, bootstrapped.client_id, [9])
    report_file = tmp_path / "report.json"
    client = str(bootstrapped.client_id)

    dry = _reconcile(config_file, "--client", client, "--dataset", "raw_data", "--dry-run")
    repaired = _reconcile(
        config_file,
        "--client",
        client,
        "--dataset",
        "raw_data",
        "--grace",
        "0.2",
        "--report",
        str(report_file),
    )
    clean = _reconcile(config_file, "--client", client, "--dataset", "raw_data")

    assert dry.returncode == 3, dry.stderr
    assert repaired.returncode == 3, repaired.stderr
    report = json.loads(report_file.read_text())
    assert report["summary"] == {"in_sync": 0, "repaired": 1, "drift": 0, "failed": 0}
    [target] = report["targets"]
    assert (target["target"], target["outcome"], target["method"]) == (
        str(bootstrapped),
        "repaired",
        "segments",
    )
    assert (target["rows"], target["rows_changed"], target["segments_rewritten"]) == (ROWS, 1, 1)
    assert "repaired" in repaired.stdout and str(bootstrapped) in repaired.stdout
    assert clean.returncode == 0, clean.stderr
    assert "1 in sync" in clean.stdout
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def test_a_failed_target_exits_1_and_says_why(
    config_file: Path, small_settings: Settings, pg: psycopg.Connection, client_id: int
) -> None:
    # Rows in the database and a registry entry pointing at a manifest that is not below
    # this target's prefix: refused, reported, and the run fails.
    from snapshots.manifest import SourcePosition
    from snapshots.registry import TargetState, VersionRegistry

    target = Target("entities", client_id)
    registry = VersionRegistry(small_settings.redis)
    bogus = TargetState(1, "elsewhere/manifests/x.json", SourcePosition(), 0.0)
    registry.compare_and_set(target, None, bogus)
    registry.close()

    result = _reconcile(config_file, "--client", str(client_id), "--dataset", "entities")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stdout and "elsewhere/manifests/x.json" in result.stdout


def test_bad_arguments_exit_2_naming_them(config_file: Path) -> None:
    both = _reconcile(config_file, "--client", "7", "--all")
    neither = _reconcile(config_file)
    bad_client = _reconcile(config_file, "--client", "07")
    bad_dataset = _reconcile(config_file, "--dataset", "nope", "--all")

    assert both.returncode == 2 and "--client and --all" in both.stderr
    assert neither.returncode == 2 and "--all" in neither.stderr
    assert bad_client.returncode == 2 and "'07'" in bad_client.stderr
    assert bad_dataset.returncode == 2 and "'nope'" in bad_dataset.stderr
