"""The hand-off test: is a change's transaction visible in the bootstrap's snapshot?"""

from __future__ import annotations

import random

import pytest

from consumer.handoff import PgSnapshot

EPOCH = 2**32


def reference_visible(snapshot: PgSnapshot, xid8: int) -> bool:
    """The definition, on full 64-bit ids."""
    return xid8 < snapshot.xmin or (xid8 < snapshot.xmax and xid8 not in snapshot.xip)


def random_snapshot(rng: random.Random, xmax: int) -> PgSnapshot:
    span = rng.choice([0, 1, 5, 1_000, 200_000])
    xmin = max(3, xmax - span)
    running = (
        [xid for xid in range(xmin, xmax) if rng.random() < 0.3][:50]
        if span < 2_000
        else (sorted(rng.sample(range(xmin, xmax), 40)))
    )
    xip = {xmin, *running} if xmin < xmax else set()
    return PgSnapshot(xmin, xmax, frozenset(xip))


def test_parse_reads_what_pg_current_snapshot_prints() -> None:
    snapshot = PgSnapshot.parse("4294967290:4294967301:4294967291,4294967299")

    assert snapshot == PgSnapshot(4294967290, 4294967301, frozenset({4294967291, 4294967299}))
    assert str(snapshot) == "4294967290:4294967301:4294967291,4294967299"
    assert PgSnapshot.parse("751:751:") == PgSnapshot(751, 751, frozenset())


@pytest.mark.parametrize(
    "text",
    ["", "1:2", "1:2:3:4", "a:5:", "5:4:", "3:9:2", "3:9:9", "-1:5:", "1: 5:", str(2**64) + ":1:"],
)
def test_parse_refuses_what_is_not_a_snapshot(text: str) -> None:
    with pytest.raises(ValueError, match="pg_snapshot"):
        PgSnapshot.parse(text)


def test_visibility_on_full_ids() -> None:
    snapshot = PgSnapshot.parse("100:110:100,104")

    assert snapshot.is_visible(99)
    assert not snapshot.is_visible(100)  # running when the snapshot was taken
    assert snapshot.is_visible(101)
    assert not snapshot.is_visible(104)
    assert snapshot.is_visible(109)
    assert not snapshot.is_visible(110)  # started after
    assert not snapshot.is_visible(5_000)


def test_a_32_bit_xid_is_widened_across_the_epoch_boundary() -> None:
    # xmin in epoch 0, xmax in epoch 1: the snapshot straddles the wrap of the 32-bit xid.
    snapshot = PgSnapshot.parse(f"{EPOCH - 6}:{EPOCH + 5}:{EPOCH - 6},{EPOCH + 2}")

    assert snapshot.widen(EPOCH - 10) == EPOCH - 10
    assert snapshot.widen(4) == EPOCH + 4
    assert snapshot.is_visible(EPOCH - 10)  # committed before xmin
    assert not snapshot.is_visible(EPOCH - 6)  # running
    assert snapshot.is_visible(EPOCH - 1)  # committed, last xid of epoch 0
    assert snapshot.is_visible(3)  # first normal xid of epoch 1, committed
    assert not snapshot.is_visible(2**32 + 2)  # running, given as 64 bits
    assert not snapshot.is_visible(5)  # = xmax in epoch 1: started after the snapshot
    assert not snapshot.is_visible(EPOCH + 5)
    assert snapshot.is_visible(2)  # the permanent frozen xid, whatever the epoch


def test_negative_32_bit_xids_are_read_as_unsigned() -> None:
    snapshot = PgSnapshot.parse(f"{EPOCH - 100}:{EPOCH - 50}:")

    assert snapshot.widen(-101) == EPOCH - 101
    assert snapshot.is_visible(-101)
    assert not snapshot.is_visible(-40)


def test_permanent_and_invalid_xids() -> None:
    snapshot = PgSnapshot.parse(f"{5 * EPOCH + 10}:{5 * EPOCH + 20}:")

    assert snapshot.is_visible(1) and snapshot.is_visible(2)
    with pytest.raises(ValueError, match="invalid xid"):
        snapshot.is_visible(0)
    with pytest.raises(ValueError, match="not a 32-bit or 64-bit xid"):
        snapshot.is_visible(-(2**31) - 1)
    with pytest.raises(ValueError, match="not a 32-bit or 64-bit xid"):
        snapshot.is_visible(2**64)


def test_epoch_zero_xid8_values_need_no_widening() -> None:
    snapshot = PgSnapshot.parse("1000:1010:1003")

    for xid in range(900, 1100):
        assert snapshot.widen(xid) == xid
        assert snapshot.is_visible(xid) == reference_visible(snapshot, xid)


def test_32_and_64_bit_ids_agree_on_random_snapshots() -> None:
    """Property: within 2^31 of xmax, the 32-bit xid decides exactly like the 64-bit one."""
    rng = random.Random(20240601)
    boundary_xmaxes = [EPOCH + d for d in range(-3, 8)] + [7 * EPOCH + d for d in (-1, 0, 1, 2)]

    for round_ in range(600):
        if round_ < len(boundary_xmaxes) * 10:
            xmax = boundary_xmaxes[round_ % len(boundary_xmaxes)]
        else:
            xmax = rng.randrange(3, 2**40)
        snapshot = random_snapshot(rng, xmax)

        probes = [*snapshot.xip, snapshot.xmin - 1, snapshot.xmin, snapshot.xmax - 1, snapshot.xmax]
        probes += [xmax + rng.randrange(-(2**31), 2**31) for _ in range(30)]
        probes += [xmax + rng.randrange(-300, 300) for _ in range(30)]
        for xid8 in probes:
            if xid8 < 3 or xid8 % EPOCH < 3:
                continue  # not a normal transaction id
            expected = reference_visible(snapshot, xid8)
            assert snapshot.is_visible(xid8) == expected, (str(snapshot), xid8)
            assert snapshot.is_visible(xid8 % EPOCH) == expected, (str(snapshot), xid8)
            assert snapshot.widen(xid8 % EPOCH) == xid8


def test_widening_window_is_centred_on_xmax() -> None:
    snapshot = PgSnapshot.parse(f"{3 * EPOCH + 100}:{3 * EPOCH + 100}:")

    assert snapshot.widen(100 + 2**31 - 1) == 3 * EPOCH + 100 + 2**31 - 1
    assert snapshot.widen(100 + 2**31) == 2 * EPOCH + 100 + 2**31


def test_what_debezium_reported_on_a_database_in_epoch_3() -> None:
    # Observed with Debezium 3.6.1 on a PostgreSQL cluster moved to epoch 3 (pg_resetwal -e 3):
    # the transaction pg_current_xact_id() called 12884902615 came with source.txId 727.
    snapshot = PgSnapshot.parse("12884902613:12884902613:")

    assert 12884902615 % EPOCH == 727
    assert snapshot.widen(727) == 12884902615
    assert not snapshot.is_visible(727)
    assert snapshot.is_visible(725 - 100)
