"""The poll loop's routing and backpressure, with Kafka replaced by a recorder of calls.

The registry is the real Redis (empty for this test's prefix); only the group member is a
stand-in, since what is checked is which partitions the loop pauses, resumes and seeks.
"""

from __future__ import annotations

from typing import Any

from consumer.app import ConsumerApp
from consumer.decoding import ChangeEvent
from schemas.datasets import Target
from storage_builder.settings import Settings

TOPIC = "sb.public.entities"


class RecordingMember:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.started = True

    def pause(self, partitions: list[tuple[str, int]]) -> None:
        self.calls.append(("pause", sorted(partitions)))

    def resume(self, partitions: list[tuple[str, int]]) -> None:
        self.calls.append(("resume", sorted(partitions)))

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.calls.append(("seek", (topic, partition, offset)))


def _app(settings: Settings, budget_mb: int = 8) -> tuple[ConsumerApp, RecordingMember]:
    chosen = settings.model_copy(
        update={"consumer": settings.consumer.model_copy(update={"memory_budget_mb": budget_mb})}
    )
    app = ConsumerApp(chosen)
    member = RecordingMember()
    app.member = member  # type: ignore[assignment]
    for partition in (0, 1):
        app.offsets.assign(TOPIC, partition, start=0, committed=0)
    return app, member


def _event(client: int, key: int, offset: int, name: str = "x", partition: int = 0) -> ChangeEvent:
    row = {"id": key, "client_id": client, "name": name}
    return ChangeEvent(
        "u", Target("entities", client), key, row, 10, 1, 0, TOPIC, partition, offset
    )


def test_changes_are_routed_to_their_target_and_hold_back_the_commit(
    settings: Settings, client_id: int
) -> None:
    app, _ = _app(settings)

    app._route(_event(client_id, 1, 5))
    app._route(_event(client_id + 1, 1, 6))
    app._route(_event(client_id, 1, 7, name="later"))
    for offset in (5, 6, 7):
        app.offsets.consumed(TOPIC, 0, offset)

    batch = app.batches[Target("entities", client_id)]
    assert len(batch) == 1 and batch.changes[1].row == {
        "id": 1,
        "client_id": client_id,
        "name": "later",
    }
    assert app.offsets.commits_due() == {(TOPIC, 0): 5}  # both batches are unpublished

    app._forget_batch(batch)  # as after its publish
    app._forget_batch(app.batches[Target("entities", client_id + 1)])
    assert app.offsets.commits_due() == {(TOPIC, 0): 8}


def test_events_read_again_after_a_rewind_are_not_added_twice(
    settings: Settings, client_id: int
) -> None:
    app, _ = _app(settings)
    app._route(_event(client_id, 1, 5, name="first"))
    app._route(_event(client_id, 1, 6, name="second"))

    app._route(_event(client_id, 1, 5, name="first"))

    batch = app.batches[Target("entities", client_id)]
    assert batch.changes[1].row is not None and batch.changes[1].row["name"] == "second"
    assert batch.events == 2


def test_partitions_pause_over_the_memory_budget_and_resume_after_a_flush(
    settings: Settings, client_id: int
) -> None:
    app, member = _app(settings, budget_mb=8)
    big = "x" * 100_000
    for offset in range(100):  # about 10 MB of buffered rows
        app._route(_event(client_id, offset, offset, name=big))

    app._backpressure()
    assert member.calls == [("pause", [(TOPIC, 0), (TOPIC, 1)])]
    assert app.paused == {(TOPIC, 0), (TOPIC, 1)}

    app._forget_batch(app.batches[Target("entities", client_id)])  # as after its publish
    app._backpressure()
    assert member.calls[-1] == ("resume", [(TOPIC, 0), (TOPIC, 1)])
    assert not app.paused and app.buffered_bytes == 0


def test_a_lost_compare_and_set_reads_the_partition_again_from_the_batch(
    settings: Settings, client_id: int
) -> None:
    app, member = _app(settings)
    for offset in range(10, 20):
        app.offsets.consumed(TOPIC, 0, offset)

    app._rewind(TOPIC, 0, 12)

    assert member.calls == [("seek", (TOPIC, 0, 12))]
    assert app.offsets.commits_due()[(TOPIC, 0)] == 12
