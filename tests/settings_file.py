"""Settings written as a TOML file, for the `storage-builder` subprocesses tests start.

Secrets are written in clear: these files live in a test's temporary folder only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage_builder.settings import Settings


def toml_value(value: Any) -> str:
    """One setting's value as TOML."""
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_settings(settings: Settings, path: Path) -> Path:
    """Write every section of ``settings`` to ``path``; unset (None) settings are left out."""
    lines = []
    for section in type(settings).model_fields:
        lines.append(f"[{section}]")
        for name, value in getattr(settings, section):
            if value is not None:
                lines.append(f"{name} = {toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path
