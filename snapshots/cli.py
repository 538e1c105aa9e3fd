"""``storage-builder snapshot ...``: inspect, export, reindex and collect snapshots.

Other packages add their own commands to ``snapshot_app`` (the bootstrap adds ``verify``).
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
from decimal import Decimal
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
import typer

from schemas.datasets import Target, get_dataset
from snapshots.reader import open_snapshot
from snapshots.registry import VersionRegistry, reindex
from snapshots.retention import collect_garbage
from snapshots.store import ObjectStore
from storage_builder.cli import settings_of
from storage_builder.errors import ConfigError

snapshot_app = typer.Typer(
    help="Inspect, export, reindex and collect snapshots.", no_args_is_help=True
)

DatasetOption = Annotated[str | None, typer.Option("--dataset", help="Dataset name.")]
ClientOption = Annotated[str | None, typer.Option("--client", help="Client id.")]


def register(app: typer.Typer) -> None:
    """Add ``snapshot`` to the ``storage-builder`` app, and ``bench segments``."""
    from storage_builder.bench import bench_app

    app.add_typer(snapshot_app, name="snapshot")
    bench_app.command("segments")(_bench_segments)


def _target(dataset: str | None, client: str | None) -> Target:
    if dataset is None or client is None:
        raise ConfigError("name the target with both --dataset and --client")
    return Target.parse(dataset, client)


@snapshot_app.command("show")
def show(
    ctx: typer.Context,
    dataset: DatasetOption = None,
    client: ClientOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Summarise the current snapshot of a target: version, source position, segments."""
    target = _target(dataset, client)
    with open_snapshot(target.dataset, target.client_id, settings_of(ctx)) as snapshot:
        manifest = snapshot.manifest
        if as_json:
            body = manifest.model_dump(mode="json") | {"manifest_key": snapshot.manifest_key}
            typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
            return
        created = dt.datetime.fromtimestamp(manifest.created_at, dt.UTC).isoformat()
        typer.echo(f"target          {target}")
        typer.echo(f"version         {manifest.version}  (created {created})")
        typer.echo(f"manifest        {snapshot.manifest_key}")
        typer.echo(f"rows            {manifest.rows} in segments")
        typer.echo(f"pg snapshot     {manifest.source_position.pg_snapshot}")
        for name, offset in sorted(manifest.source_position.offsets.items()):
            typer.echo(f"offset          {name} = {offset}")
        typer.echo(f"segments        {len(manifest.segments)}")
        for segment in manifest.segments:
            typer.echo(
                f"  [{_bound(segment.lo)}, {_bound(segment.hi)})  keys {segment.min_key}.."
                f"{segment.max_key}  {segment.rows} rows  {segment.bytes} bytes  "
                f"{len(segment.block_keys)} blocks  {segment.key.rsplit('/', 1)[-1]}"
            )
        for delta in manifest.deltas:
            since = dt.datetime.fromtimestamp(delta.since, dt.UTC).isoformat()
            typer.echo(
                f"delta           {delta.publishes} publishes since {since}: {delta.upserts} "
                f"upserts, {delta.deletes} deletes  {delta.key.rsplit('/', 1)[-1]}"
            )


def _bound(value: int | None) -> str:
    return "-inf" if value is None else str(value)


def _text(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


@snapshot_app.command("export")
def export(
    ctx: typer.Context,
    dataset: DatasetOption = None,
    client: ClientOption = None,
    output_format: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    output: Annotated[Path | None, typer.Option("--output", help="File (default stdout).")] = None,
) -> None:
    """Write every row of a target's current snapshot, in key order."""
    if output_format not in ("jsonl", "csv"):
        raise typer.BadParameter(f"{output_format!r} is not jsonl or csv", param_hint="--format")
    target = _target(dataset, client)
    columns = get_dataset(target.dataset).column_names
    with open_snapshot(target.dataset, target.client_id, settings_of(ctx)) as snapshot:
        stream: IO[str] = output.open("w", newline="") if output else sys.stdout
        try:
            if output_format == "csv":
                writer = csv.writer(stream)
                writer.writerow(columns)
                for row in snapshot:
                    # None becomes an empty field; text columns keep any character.
                    writer.writerow(["" if row[c] is None else _text(row[c]) for c in columns])
            else:
                for row in snapshot:
                    stream.write(orjson.dumps(row, default=_text).decode() + "\n")
        finally:
            if output:
                stream.close()


@snapshot_app.command("reindex")
def reindex_command(
    ctx: typer.Context,
    dataset: DatasetOption = None,
    client: ClientOption = None,
    all_targets: Annotated[bool, typer.Option("--all", help="Every target in S3.")] = False,
) -> None:
    """Rebuild the Redis registry from the newest manifests in S3 (after Redis lost keys)."""
    if all_targets == (dataset is not None or client is not None):
        raise ConfigError("give either --all or both --dataset and --client")
    settings = settings_of(ctx)
    targets = None if all_targets else [_target(dataset, client)]
    registry = VersionRegistry(settings.redis)
    try:
        written = reindex(registry, ObjectStore(settings.s3), settings.s3.prefix, targets)
    finally:
        registry.close()
    typer.echo(orjson.dumps({"restored": written}).decode())


@snapshot_app.command("gc")
def gc_command(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, delete nothing.")] = False,
) -> None:
    """Delete objects no snapshot published within snapshot.retention_s refers to."""
    settings = settings_of(ctx)
    registry = VersionRegistry(settings.redis)
    try:
        report = collect_garbage(
            ObjectStore(settings.s3),
            registry,
            settings.s3.prefix,
            settings.snapshot.retention_s,
            dry_run=dry_run,
        )
    finally:
        registry.close()
    summary = {
        "dry_run": dry_run,
        "targets": report.targets,
        "skipped": report.skipped,
        "deleted_objects": len(report.deleted),
        "deleted_packs": report.packs,
        "bytes_freed": report.bytes_freed,
    }
    if dry_run:
        summary["would_delete"] = report.deleted
    typer.echo(orjson.dumps(summary).decode())


def _bench_segments(
    ctx: typer.Context,
    rows: Annotated[int, typer.Option(help="Rows to encode.")] = 100_000,
    segment_rows: Annotated[int, typer.Option(help="Rows of the rewritten segment.")] = 20_000,
    changed: Annotated[int, typer.Option(help="Keys changed by the rewrite.")] = 5,
    repeat: Annotated[int, typer.Option(help="Runs per figure (median).")] = 3,
    block_rows: Annotated[
        int | None, typer.Option(help="Rows per block (default snapshot.block_rows).")
    ] = None,
) -> None:
    """Segment encoding rate and rewrite time (whole segment vs block level)."""
    from snapshots import benchmark

    snapshot = settings_of(ctx).snapshot
    result = benchmark.run(
        rows=rows,
        segment_rows=segment_rows,
        changed=changed,
        codec=snapshot.codec,
        block_rows=block_rows or snapshot.block_rows,
        repeat=repeat,
    )
    typer.echo(orjson.dumps(result).decode())
