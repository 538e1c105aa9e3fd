"""``storage-builder bench ...``: benchmarks that print one JSON object per workload."""

import orjson
import typer

bench_app = typer.Typer(help="Benchmarks: each prints one JSON object.", no_args_is_help=True)


@bench_app.command("decode")
def decode(events: int = typer.Option(200_000, min=1000, help="Envelopes per run.")) -> None:
    """Debezium envelopes of raw_data decoded per second on one core."""
    from consumer.decode_bench import run_decode_bench

    typer.echo(orjson.dumps(run_decode_bench(events)).decode())


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
