"""The nightly schedules in ops/schedules: concurrency forbidden, a timeout, and a command
line the CLI accepts."""

from __future__ import annotations

import configparser
import json
import shlex
from pathlib import Path

import yaml
from typer.main import get_command

from storage_builder.cli import _register_subcommands, app

SCHEDULES = Path(__file__).resolve().parents[2] / "ops" / "schedules"


def _reconcile_options() -> set[str]:
    _register_subcommands()
    command = get_command(app).commands["reconcile"]  # type: ignore[attr-defined]
    return {option for param in command.params for option in param.opts}


def _check_command(words: list[str]) -> None:
    """The words after `storage-builder` name `reconcile --all` and only real options."""
    words = words[next(i for i, w in enumerate(words) if w.endswith("storage-builder")) :]
    assert words[words.index("reconcile") + 1 :][:1] == ["--all"]
    known = _reconcile_options() | {"--log-format", "--config"}
    options = [word for word in words if word.startswith("--")]
    assert set(options) <= known, set(options) - known


def test_the_crontab_line_forbids_overlap_and_times_out() -> None:
    line = next(
        line
        for line in (SCHEDULES / "crontab").read_text().splitlines()
        if line and not line.startswith("#") and "storage-builder" in line and " * " in line
    )
    fields = shlex.split(line)
    assert len(fields[:5]) == 5 and fields[5:7] == ["flock", "-n"]
    assert "timeout" in fields
    _check_command(fields)


def test_the_systemd_timer_starts_a_oneshot_service_with_a_limit() -> None:
    timer = configparser.ConfigParser()
    timer.read(SCHEDULES / "storage-builder-reconcile.timer")
    service = configparser.ConfigParser(strict=False)
    service.read(SCHEDULES / "storage-builder-reconcile.service")

    assert timer["Timer"]["Unit"] == "storage-builder-reconcile.service"
    assert timer["Timer"]["OnCalendar"]
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["RuntimeMaxSec"] == "2h"
    assert service["Service"]["SuccessExitStatus"] == "3"
    _check_command(shlex.split(service["Service"]["ExecStart"].replace("\\\n", " ")))


def test_the_kubernetes_cronjob_forbids_concurrency_and_has_a_deadline() -> None:
    cronjob = yaml.safe_load((SCHEDULES / "reconcile-cronjob.yaml").read_text())

    assert cronjob["kind"] == "CronJob"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] == 7200
    [container] = job["template"]["spec"]["containers"]
    _check_command(shlex.split(container["args"][0].split(";")[0]))


def test_the_dkron_job_forbids_concurrency_and_has_a_timeout() -> None:
    job = json.loads((SCHEDULES / "reconcile-dkron.json").read_text())

    assert job["concurrency"] == "forbid"
    assert len(job["schedule"].split()) == 6  # Dkron's schedules start with seconds
    assert job["executor"] == "shell" and job["executor_config"]["timeout"] == "2h"
    _check_command(shlex.split(job["executor_config"]["command"]))


def _check_gc_command(words: list[str]) -> None:
    """The words after `storage-builder` name `snapshot gc` and only real options."""
    words = words[next(i for i, w in enumerate(words) if w.endswith("storage-builder")) :]
    assert words[words.index("snapshot") + 1 :][:1] == ["gc"]
    _register_subcommands()
    snapshot = get_command(app).commands["snapshot"]  # type: ignore[attr-defined]
    gc = snapshot.commands["gc"]
    known = {option for param in gc.params for option in param.opts} | {"--log-format"}
    options = [word for word in words if word.startswith("--")]
    assert set(options) <= known, set(options) - known


def test_the_hourly_gc_runs_in_every_scheduler_without_overlap_and_with_a_limit() -> None:
    line = next(
        line
        for line in (SCHEDULES / "crontab").read_text().splitlines()
        if line and not line.startswith("#") and "snapshot gc" in line
    )
    fields = shlex.split(line)
    assert fields[:2] == ["15", "*"] and fields[5:7] == ["flock", "-n"]
    assert fields[fields.index("timeout") + 2] == "50m"
    _check_gc_command(fields)

    timer = configparser.ConfigParser()
    timer.read(SCHEDULES / "storage-builder-gc.timer")
    service = configparser.ConfigParser(strict=False)
    service.read(SCHEDULES / "storage-builder-gc.service")
    assert timer["Timer"]["Unit"] == "storage-builder-gc.service"
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["RuntimeMaxSec"] == "50min"
    _check_gc_command(shlex.split(service["Service"]["ExecStart"]))

    cronjob = yaml.safe_load((SCHEDULES / "gc-cronjob.yaml").read_text())
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] == 3000
    [container] = job["template"]["spec"]["containers"]
    _check_gc_command(container["args"])

    dkron = json.loads((SCHEDULES / "gc-dkron.json").read_text())
    assert dkron["concurrency"] == "forbid" and dkron["executor_config"]["timeout"] == "50m"
    _check_gc_command(shlex.split(dkron["executor_config"]["command"]))
