"""``storage-builder snapshot ...`` end to end, as an operator runs it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis
from settings_file import write_settings

from schemas.datasets import Target
from snapshots.publish import SnapshotWriter
from storage_builder.settings import Settings


def _run(config: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "storage-builder"
    command = [str(script), "--config", str(config), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_show_export_reindex_gc(
    writer: SnapshotWriter,
    seed: Any,
    make_row: Any,
    settings: Settings,
    redis_client: redis.Redis,
    target: Target,
    tmp_path: Path,
) -> None:
    seed(target, [3, 1, 2])
    config = write_settings(settings, tmp_path / "services.toml")
    where = ["--dataset", target.dataset, "--client", str(target.client_id)]

    shown = _run(config, "snapshot", "show", *where, "--json")
    assert shown.returncode == 0, shown.stderr
    manifest = json.loads(shown.stdout)
    assert (manifest["version"], manifest["rows"], len(manifest["segments"])) == (1, 3, 1)
    text = _run(config, "snapshot", "show", *where)
    assert "version         1" in text.stdout and "3 rows" in text.stdout

    exported = _run(config, "snapshot", "export", *where)
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["id"] for line in lines] == [1, 2, 3]
    assert lines[0]["currency"] == make_row("raw_data", 1, target.client_id)["currency"]
    output = tmp_path / "rows.csv"
    _run(config, "snapshot", "export", *where, "--format", "csv", "--output", str(output))
    table = list(csv.reader(io.StringIO(output.read_text())))
    assert table[0][0] == "id" and [row[0] for row in table[1:]] == ["1", "2", "3"]

    for key in redis_client.scan_iter(match=f"{settings.redis.key_prefix}*"):
        redis_client.delete(key)
    reindexed = _run(config, "snapshot", "reindex", "--all")
    assert json.loads(reindexed.stdout) == {"restored": 1}, reindexed.stderr
    assert writer.registry.get(target) is not None

    collected = _run(config, "snapshot", "gc", "--dry-run")
    assert json.loads(collected.stdout)["deleted_objects"] == 0, collected.stderr


def test_errors_are_one_line_naming_what_to_change(settings: Settings, tmp_path: Path) -> None:
    config = write_settings(settings, tmp_path / "services.toml")
    missing = _run(config, "snapshot", "show", "--dataset", "raw_data", "--client", "12345678901")
    assert missing.returncode == 2 and "has no snapshot" in missing.stderr
    bad = _run(config, "snapshot", "show", "--dataset", "raw_data", "--client", "../7")
    assert bad.returncode == 2 and "client id '../7' is not a plain integer" in bad.stderr
    both = _run(config, "snapshot", "reindex")
    assert both.returncode == 2 and "--all" in both.stderr
