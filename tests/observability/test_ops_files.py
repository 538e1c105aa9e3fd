"""The alert rules (promtool) and the Grafana dashboard against the metrics we export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from storage_builder import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = ROOT / "ops" / "tools" / "promtool"
RULES = ROOT / "ops" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "rules.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboard.json"
RUNBOOK = ROOT / "ops" / "runbook.md"

_METRIC = re.compile(r"\bstorage_builder_[a-z0-9_]+")
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported_series(tmp_path: Path) -> set[str]:
    """Every series name the project exports: consumer, lag monitor and batch-job files."""
    texts = [generate_latest(metrics.REGISTRY), generate_latest(metrics.MONITOR_REGISTRY)]
    path = metrics.write_job_metrics(
        "reconcile", succeeded=True, duration_s=1, targets={"in_sync": 1},
        drift_rows={"raw_data": 0}, directory=tmp_path,
    )  # fmt: skip
    assert path is not None
    names: set[str] = set()
    for text in [t.decode() for t in texts] + [path.read_text()]:
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
    # Label-less families with no sample yet still count by their family name and suffixes.
    return names | {name + suffix for name in names for suffix in _SERIES_SUFFIXES}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def rules() -> dict[str, str]:
    """Each alert's name and its text in rules.yml (promtool has checked the YAML itself)."""
    chunks = re.split(r"^\s*- alert: ", RULES.read_text(), flags=re.MULTILINE)[1:]
    return {chunk.split("\n", 1)[0].strip(): chunk for chunk in chunks}


def test_every_alert_has_a_synthetic_test_and_a_runbook_section() -> None:
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    runbook = RUNBOOK.read_text()
    alerts = rules()
    assert len(alerts) == 15
    for name, text in alerts.items():
        assert name in tested, f"{name} has no test in {RULE_TESTS.name}"
        assert f"\n## {name}\n" in runbook, f"{name} has no section in the runbook"
        assert f'runbook: "ops/runbook.md#{name.lower()}"' in text


def test_every_metric_in_the_rules_is_exported(tmp_path: Path) -> None:
    exported = exported_series(tmp_path)
    for alert, text in rules().items():
        for name in _METRIC.findall(text):
            assert name in exported, f"alert {alert} reads {name}, which nobody exports"


def test_dashboard_loads_and_every_query_names_an_exported_metric(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series(tmp_path)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    titles = " ".join(p["title"].lower() for p in panels)
    for shown in ("lag", "changes applied", "publish latency", "staleness"):
        assert shown in titles

    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = _METRIC.findall(target["expr"])
            assert names, f"panel {panel['title']!r} queries no storage_builder metric"
            for name in names:
                assert name in exported, f"panel {panel['title']!r} reads unknown {name}"


@pytest.mark.parametrize("name", ["storage_builder_unknown_metric"])
def test_the_exported_check_can_fail(tmp_path: Path, name: str) -> None:
    assert name not in exported_series(tmp_path)


def test_runbook_documents_every_lag_exit_code() -> None:
    from consumer.lag import EXIT_CODES

    rows = dict(re.findall(r"^\| (\d) \| (\w+|\(none\)) \|", RUNBOOK.read_text(), re.MULTILINE))
    assert {int(code): status for code, status in rows.items() if status != "(none)"} == {
        code: status for status, code in EXIT_CODES.items()
    }
    assert rows["2"] == "(none)"  # the command failed: the CLI's own exit code


def test_lag_is_a_subcommand_of_the_console_script() -> None:
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "storage-builder"), "lag", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for option in ("--window", "--connector", "--group", "--json"):
        assert option in result.stdout
