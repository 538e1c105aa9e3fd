"""Generates ``schemas/avro/<dataset>.avsc`` from the dataset definitions.

The checked-in files are for readers and for tools outside Python; the code always builds
the schema from ``Dataset.avro_schema()``, and a test keeps the two equal. Run
``python -m schemas.avro_gen`` after changing a dataset, or ``--check`` to only compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.datasets import DATASETS

AVRO_DIR = Path(__file__).resolve().parent / "avro"


def render_avro_schemas() -> dict[str, str]:
    """The text of every dataset's ``.avsc`` file, keyed by file name."""
    return {
        f"{name}.avsc": json.dumps(dataset.avro_schema(), indent=2, ensure_ascii=False) + "\n"
        for name, dataset in sorted(DATASETS.items())
    }


def stale_avro_files(directory: Path = AVRO_DIR) -> list[str]:
    """The ``.avsc`` files in ``directory`` that are missing, differ or belong to no dataset."""
    expected = render_avro_schemas()
    present = {path.name for path in directory.glob("*.avsc")}
    stale = [
        name
        for name, text in expected.items()
        if name not in present or (directory / name).read_text(encoding="utf-8") != text
    ]
    return sorted(stale + sorted(present - expected.keys()))


def write_avro_schemas(directory: Path = AVRO_DIR) -> list[str]:
    """Write every dataset's ``.avsc`` file and remove ones of datasets that no longer exist."""
    directory.mkdir(parents=True, exist_ok=True)
    expected = render_avro_schemas()
    for name, text in expected.items():
        (directory / name).write_text(text, encoding="utf-8")
    for path in directory.glob("*.avsc"):
        if path.name not in expected:
            path.unlink()
    return sorted(expected)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        stale = stale_avro_files()
        for name in stale:
            print(f"{AVRO_DIR / name} is out of date; run python -m schemas.avro_gen")
        return 1 if stale else 0
    if args:
        print("usage: python -m schemas.avro_gen [--check]", file=sys.stderr)
        return 2
    for name in write_avro_schemas():
        print(f"wrote {AVRO_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
