"""``storage-builder bench ...``: benchmarks that print one JSON object per workload."""

import typer

bench_app = typer.Typer(help="Benchmarks: each prints one JSON object.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
