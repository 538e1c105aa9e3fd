"""The consumer's /metrics, /healthz and /readyz over HTTP, parsed with prometheus-client."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage_builder import metrics
from storage_builder.metrics import HealthState, MetricsServer, serve


@pytest.fixture
def health() -> HealthState:
    return HealthState(poll_timeout_s=5.0)


@pytest.fixture
def server(health: HealthState) -> Iterator[MetricsServer]:
    running = serve("127.0.0.1", 0, health)
    yield running
    running.close()


def get(server: MetricsServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(server, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_scraped_values_match_what_was_recorded(server: MetricsServer) -> None:
    dataset = "formula_associations"
    before = scrape(server)
    labels = (("dataset", dataset), ("how", "delta"))
    batches = before.get(("storage_builder_batches_applied_total", labels), 0.0)

    metrics.BATCHES_APPLIED.labels(dataset=dataset, how="delta").inc(3)
    metrics.CHANGES_APPLIED.labels(dataset=dataset, op="u").inc(41)
    metrics.CONSUMER_OFFSET_LAG.labels(topic="sb.public.entities", partition="5").set(1234)
    metrics.CONSUMER_TIME_LAG.labels(topic="sb.public.entities", partition="5").set(2.5)
    metrics.DEAD_LETTER_EVENTS.labels(reason="decode").inc()
    metrics.PAUSED_PARTITIONS.set(2)
    metrics.PUBLISH_DURATION.labels(dataset=dataset).observe(0.2)
    metrics.PUBLISH_DURATION.labels(dataset=dataset).observe(3.0)
    metrics.REBALANCES.labels(kind="assign").inc()

    after = scrape(server)
    name = "storage_builder_batches_applied_total"
    assert value(after, name, dataset=dataset, how="delta") == batches + 3
    assert value(after, "storage_builder_changes_applied_total", dataset=dataset, op="u") >= 41
    assert (
        value(
            after, "storage_builder_consumer_offset_lag", topic="sb.public.entities", partition="5"
        )
        == 1234
    )
    assert (
        value(
            after,
            "storage_builder_consumer_time_lag_seconds",
            topic="sb.public.entities",
            partition="5",
        )
        == 2.5
    )
    assert value(after, "storage_builder_paused_partitions") == 2
    assert value(after, "storage_builder_rebalances_total", kind="assign") >= 1
    assert value(after, "storage_builder_dead_letter_events_total", reason="decode") >= 1

    # A histogram: 0.2 s falls in the 0.25 bucket, 3.0 s only from the 5 s bucket on.
    bucket = "storage_builder_publish_duration_seconds_bucket"
    assert value(after, bucket, dataset=dataset, le="0.25") == 1
    assert value(after, bucket, dataset=dataset, le="5.0") == 2
    assert value(after, "storage_builder_publish_duration_seconds_count", dataset=dataset) == 2
    assert value(after, "storage_builder_publish_duration_seconds_sum", dataset=dataset) == 3.2


def test_every_contract_metric_is_exported(server: MetricsServer) -> None:
    _, text = get(server, "/metrics")
    families = {family.name for family in text_string_to_metric_families(text)}
    for name in (
        "consumer_offset_lag", "consumer_time_lag_seconds", "batches_applied",
        "changes_applied", "publish_duration_seconds", "commit_to_publish_seconds",
        "segments_written", "bytes_written", "dead_letter_events", "publish_conflicts",
        "events_skipped", "paused_partitions", "buffered_changes", "buffered_bytes",
        "rebalances", "last_poll_timestamp_seconds", "max_target_staleness_seconds",
    ):  # fmt: skip
        assert f"storage_builder_{name}" in families


def test_healthz_fails_until_the_poll_loop_runs_and_when_it_stops(
    server: MetricsServer, health: HealthState
) -> None:
    assert get(server, "/healthz")[0] == 503

    health.polled()
    assert get(server, "/healthz")[0] == 200

    # A poll loop blocked for longer than the threshold: the server still answers, with 503.
    health.polled(now=time.time() - 60)
    status, body = get(server, "/healthz")
    assert status == 503
    assert "poll loop last returned" in body


def test_a_blocked_poll_loop_thread_cannot_keep_healthz_green(
    server: MetricsServer, health: HealthState
) -> None:
    blocked = threading.Event()
    release = threading.Event()

    def poll_loop() -> None:
        health.polled(now=time.time() - 10)  # its last turn, older than the 5 s limit
        blocked.set()
        release.wait()  # stuck, e.g. in a call that never returns

    thread = threading.Thread(target=poll_loop, daemon=True)
    thread.start()
    blocked.wait(5)
    try:
        assert get(server, "/healthz")[0] == 503
    finally:
        release.set()
        thread.join(5)


def test_readyz_requires_assignment_no_stall_and_every_service(
    server: MetricsServer, health: HealthState
) -> None:
    health.polled()
    status, body = get(server, "/readyz")
    assert status == 503
    assert "no partition is assigned" in body
    assert "s3: not contacted yet" in body

    health.assigned([("sb.public.raw_data", 0)])
    for service in ("kafka", "redis", "s3"):
        health.contact_ok(service)
    assert get(server, "/readyz") == (200, "ready\n")

    health.contact_failed("s3", "endpoint 127.0.0.1:9000 refused the connection")
    status, body = get(server, "/readyz")
    assert status == 503 and "s3: endpoint 127.0.0.1:9000 refused" in body

    health.contact_ok("s3")
    health.stalled(True, "publish of raw_data/7 keeps failing")
    status, body = get(server, "/readyz")
    assert status == 503 and "stalled: publish of raw_data/7" in body

    health.stalled(False)
    assert get(server, "/readyz")[0] == 200
    # Liveness fails: so does readiness.
    health.polled(now=time.time() - 60)
    assert get(server, "/readyz")[0] == 503
    assert get(server, "/healthz")[0] == 503


def test_a_busy_port_is_a_clear_error(server: MetricsServer, health: HealthState) -> None:
    from storage_builder.errors import ConfigError

    with pytest.raises(ConfigError, match="SB_CONSUMER__METRICS_PORT"):
        serve("127.0.0.1", server.port, health)
