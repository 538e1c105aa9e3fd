"""The checked-in Avro schemas are exactly what the dataset definitions generate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from schemas.avro_gen import AVRO_DIR, render_avro_schemas, stale_avro_files, write_avro_schemas
from schemas.datasets import DATASETS


def test_checked_in_schemas_are_generated() -> None:
    assert stale_avro_files() == [], "run python -m schemas.avro_gen"
    assert sorted(path.name for path in AVRO_DIR.glob("*.avsc")) == sorted(
        f"{name}.avsc" for name in DATASETS
    )


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_schema_parses_and_names_every_column(name: str) -> None:
    text = (AVRO_DIR / f"{name}.avsc").read_text(encoding="utf-8")

    parsed: Any = fastavro.parse_schema(json.loads(text))

    assert [field["name"] for field in parsed["fields"]] == list(DATASETS[name].column_names)


def test_stale_files_are_found(tmp_path: Path) -> None:
    write_avro_schemas(tmp_path)
    assert stale_avro_files(tmp_path) == []

    (tmp_path / "entities.avsc").write_text("{}")
    (tmp_path / "retired.avsc").write_text("{}")
    (tmp_path / "formulas.avsc").unlink()

    assert stale_avro_files(tmp_path) == ["entities.avsc", "formulas.avsc", "retired.avsc"]
    assert set(render_avro_schemas()) == {f"{name}.avsc" for name in DATASETS}
