"""Commands of the consumer package: ``storage-builder consume``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def consume(
    ctx: typer.Context,
    client_id: Annotated[
        str | None,
        typer.Option("--client-id", help="Kafka client.id of this member (default: host-pid)."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="Serve /metrics, /healthz, /readyz here (0: none)."),
    ] = None,
) -> None:
    """Keep snapshots current from the Debezium topics, as one member of the consumer group.

    Runs until SIGTERM or SIGINT, then publishes what it can within
    consumer.shutdown_deadline_s, commits and leaves the group. Any number of members may
    run; Kafka spreads the partitions among them.
    """
    from consumer.app import ConsumerApp
    from storage_builder import metrics
    from storage_builder.cli import settings_of

    settings = settings_of(ctx)
    health = metrics.HealthState()
    port = settings.consumer.metrics_port if metrics_port is None else metrics_port
    server = metrics.serve(settings.consumer.metrics_host, port, health) if port else None
    try:
        app = ConsumerApp(settings, client_id=client_id, health=health)
        app.install_signal_handlers()
        app.run()
    finally:
        if server is not None:
            server.close()


def register(app: typer.Typer) -> None:
    """Add ``consume`` to the app and ``stream`` to ``storage-builder bench``."""
    from consumer.bench import register_benchmarks
    from storage_builder.bench import bench_app

    app.command("consume")(consume)
    register_benchmarks(bench_app)
