"""The report of a reconciliation: per target in sync, repaired or failed, and the exit code.

The same report is printed as a table for people and written as JSON for machines; the
exit code lets a scheduler tell a clean night from drift found and repaired, and both from
a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bootstrap.bisection import RowDifference
from schemas.datasets import DATASETS, Target

IN_SYNC = "in_sync"
REPAIRED = "repaired"
DRIFT = "drift"
FAILED = "failed"

# How a drifted target was repaired.
BY_SEGMENTS = "segments"
BY_BOOTSTRAP = "bootstrap"
BY_REINDEX = "reindex"

# Exit codes of `storage-builder reconcile`, so a scheduler can alert on each.
EXIT_IN_SYNC = 0
EXIT_FAILED = 1
EXIT_DRIFT = 3


@dataclass
class TargetReport:
    """The outcome of one target."""

    target: Target
    outcome: str = IN_SYNC
    method: str | None = None
    registry_rebuilt: bool = False
    rows: int = 0
    rows_added: int = 0
    rows_changed: int = 0
    rows_removed: int = 0
    rows_in_flight: int = 0
    segments_read: int = 0
    segments_rewritten: int = 0
    version_before: int | None = None
    version_after: int | None = None
    attempts: int = 0
    seconds: float = 0.0
    reason: str | None = None

    @property
    def drift_rows(self) -> int:
        return self.rows_added + self.rows_changed + self.rows_removed

    def count(self, differences: Sequence[RowDifference]) -> None:
        kinds = [difference.kind for difference in differences]
        self.rows_added = kinds.count("added")
        self.rows_changed = kinds.count("changed")
        self.rows_removed = kinds.count("removed")

    def to_json(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "dataset": self.target.dataset,
            "client_id": self.target.client_id,
            "outcome": self.outcome,
            "method": self.method,
            "registry_rebuilt": self.registry_rebuilt,
            "rows": self.rows,
            "rows_added": self.rows_added,
            "rows_changed": self.rows_changed,
            "rows_removed": self.rows_removed,
            "rows_in_flight": self.rows_in_flight,
            "segments_read": self.segments_read,
            "segments_rewritten": self.segments_rewritten,
            "version_before": self.version_before,
            "version_after": self.version_after,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 4),
            "reason": self.reason,
        }


@dataclass
class ReconcileReport:
    """The outcome of a whole run."""

    targets: list[TargetReport]
    dry_run: bool
    grace_s: float
    started_at: float
    seconds: float = 0.0
    s3_requests: int = 0

    def counts(self) -> dict[str, int]:
        counts = {IN_SYNC: 0, REPAIRED: 0, DRIFT: 0, FAILED: 0}
        for report in self.targets:
            counts[report.outcome] += 1
        return counts

    def drift_rows(self) -> dict[str, int]:
        """Drifted rows per dataset (every dataset listed, so a gauge drops back to 0)."""
        rows = dict.fromkeys(sorted(DATASETS), 0)
        for report in self.targets:
            rows[report.target.dataset] += report.drift_rows
        return rows

    @property
    def exit_code(self) -> int:
        counts = self.counts()
        if counts[FAILED]:
            return EXIT_FAILED
        if counts[REPAIRED] or counts[DRIFT]:
            return EXIT_DRIFT
        return EXIT_IN_SYNC

    def to_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "grace_s": self.grace_s,
            "exit_code": self.exit_code,
            "summary": self.counts(),
            "rows_compared": sum(report.rows for report in self.targets),
            "drift_rows": self.drift_rows(),
            "segments_read": sum(report.segments_read for report in self.targets),
            "segments_rewritten": sum(report.segments_rewritten for report in self.targets),
            "s3_requests": self.s3_requests,
            "targets": [report.to_json() for report in self.targets],
        }


# Beyond this many targets the table lists only those not in sync; the JSON lists all.
TABLE_ALL_UP_TO = 40


def render_table(report: ReconcileReport, console: Console) -> None:
    """Print the report as a table, then one summary line."""
    shown = [
        target
        for target in report.targets
        if len(report.targets) <= TABLE_ALL_UP_TO or target.outcome != IN_SYNC
    ]
    if shown:
        table = Table(title="reconciliation" + (" (dry run)" if report.dry_run else ""))
        for column in ("target", "outcome", "rows", "added", "changed", "removed", "segments"):
            table.add_column(column, justify="left" if column in ("target", "outcome") else "right")
        table.add_column("detail", overflow="fold")
        for target in shown:
            table.add_row(
                str(target.target),
                target.outcome + (f" ({target.method})" if target.method else ""),
                str(target.rows),
                str(target.rows_added),
                str(target.rows_changed),
                str(target.rows_removed),
                str(target.segments_rewritten),
                target.reason or "",
            )
        console.print(table)
    counts = report.counts()
    console.print(
        f"{len(report.targets)} targets in {report.seconds:.1f}s: {counts[IN_SYNC]} in sync, "
        f"{counts[REPAIRED]} repaired, {counts[DRIFT]} drifted (not repaired), "
        f"{counts[FAILED]} failed; {sum(t.rows for t in report.targets)} rows compared; "
        f"exit code {report.exit_code}"
    )


def write_json(report: ReconcileReport, path: Path) -> None:
    """Write the report as JSON, through a temporary file so a reader never sees half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
    partial.replace(path)
