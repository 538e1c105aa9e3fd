"""The textfile-collector file batch jobs leave for Prometheus."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage_builder.metrics import TEXTFILE_DIR_ENV, write_job_metrics


def read(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def test_reconcile_outcome_with_drift(tmp_path: Path) -> None:
    path = write_job_metrics(
        "reconcile",
        succeeded=True,
        duration_s=12.5,
        targets={"in_sync": 598, "repaired": 2},
        drift_rows={"raw_data": 10, "entities": 0},
        directory=tmp_path,
        now=1_700_000_000.0,
    )
    assert path == tmp_path / "storage_builder_reconcile.prom"
    values = read(path)
    job = (("batch_job", "reconcile"),)
    assert values[("storage_builder_job_last_success_timestamp_seconds", job)] == 1.7e9
    assert values[("storage_builder_job_last_run_succeeded", job)] == 1
    assert values[("storage_builder_job_duration_seconds", job)] == 12.5
    assert values[("storage_builder_job_targets", job + (("outcome", "repaired"),))] == 2
    assert values[("storage_builder_reconcile_drift_rows", (("dataset", "raw_data"),))] == 10
    # Written to a temporary name and renamed: nothing else is left in the directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["storage_builder_reconcile.prom"]


def test_a_failed_run_keeps_the_last_success_time(tmp_path: Path) -> None:
    write_job_metrics("reconcile", succeeded=True, duration_s=1, directory=tmp_path, now=100.0)
    path = write_job_metrics(
        "reconcile", succeeded=False, duration_s=2, directory=tmp_path, now=500.0
    )
    assert path is not None
    values = read(path)
    job = (("batch_job", "reconcile"),)
    assert values[("storage_builder_job_last_success_timestamp_seconds", job)] == 100.0
    assert values[("storage_builder_job_last_run_timestamp_seconds", job)] == 500.0
    assert values[("storage_builder_job_last_run_succeeded", job)] == 0


def test_a_job_that_never_succeeded_has_no_success_time(tmp_path: Path) -> None:
    path = write_job_metrics("bootstrap", succeeded=False, duration_s=2, directory=tmp_path)
    assert path is not None
    names = {name for name, _ in read(path)}
    assert "storage_builder_job_last_success_timestamp_seconds" not in names
    assert "storage_builder_job_last_run_succeeded" in names


def test_directory_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEXTFILE_DIR_ENV, str(tmp_path / "textfiles"))
    path = write_job_metrics("bootstrap", succeeded=True, duration_s=1)
    assert path == tmp_path / "textfiles" / "storage_builder_bootstrap.prom"
    assert path.exists()

    monkeypatch.delenv(TEXTFILE_DIR_ENV)
    assert write_job_metrics("bootstrap", succeeded=True, duration_s=1) is None
