"""The hand-off from a bootstrap snapshot to the change stream.

A bootstrap reads a target inside one REPEATABLE READ transaction and records the text of
``pg_current_snapshot()``. A change event belongs to the bootstrap, and is skipped, iff the
transaction that made it had committed before that snapshot was taken; every other change
is applied. ``PgSnapshot.is_visible`` answers that question for the ``source.txId`` of a
Debezium event.

Transaction id widths: ``pg_current_snapshot()`` speaks ``xid8``, a 64-bit counter that
never wraps (epoch in the high 32 bits, xid in the low 32). The PostgreSQL connector of
Debezium takes ``source.txId`` from the BEGIN message of the logical replication protocol,
which carries only the 32-bit xid (sent as unsigned; very old connector versions could
show values above 2^31 as negative). ``is_visible`` therefore accepts both widths and
widens a 32-bit value to 64 bits before comparing, as described in ``PgSnapshot.widen``.
"""

from __future__ import annotations

from dataclasses import dataclass

_EPOCH = 1 << 32
_HALF_EPOCH = 1 << 31
_MAX_XID8 = (1 << 64) - 1
# xids 1 (bootstrap) and 2 (frozen) are permanent ids of rows committed before any
# transaction; 0 is the invalid xid. Normal transactions start at 3 in every epoch.
_FIRST_NORMAL_XID = 3


@dataclass(frozen=True)
class PgSnapshot:
    """A PostgreSQL MVCC snapshot as printed by ``pg_current_snapshot()``.

    ``xmin`` is the oldest transaction still running when the snapshot was taken, ``xmax``
    one past the newest transaction started, ``xip`` the transactions in [xmin, xmax)
    that were running. All three are 64-bit ``xid8`` values.
    """

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> PgSnapshot:
        """Read ``"xmin:xmax:xip1,xip2,..."`` (the xip list may be empty).

        Raises ValueError naming the text when it is not a snapshot PostgreSQL could print.
        """
        parts = text.strip().split(":") if isinstance(text, str) else []
        if len(parts) != 3:
            raise ValueError(f"pg_snapshot {text!r} is not of the form 'xmin:xmax:xip,...'")

        xmin = _parse_xid8(parts[0], text)
        xmax = _parse_xid8(parts[1], text)
        xip = frozenset(_parse_xid8(part, text) for part in parts[2].split(",") if part)

        if xmin > xmax:
            raise ValueError(f"pg_snapshot {text!r} has xmin above xmax")
        if any(not xmin <= xid < xmax for xid in xip):
            raise ValueError(f"pg_snapshot {text!r} lists a running xid outside [xmin, xmax)")
        return cls(xmin, xmax, xip)

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:" + ",".join(str(xid) for xid in sorted(self.xip))

    def widen(self, txid: int) -> int:
        """The 64-bit ``xid8`` of a transaction id given as 32 or 64 bits.

        A value of 2^32 or more already carries its epoch and is returned unchanged. A
        smaller value is taken as a 32-bit xid (a negative one as a signed 32-bit xid) and
        given the epoch that puts it nearest to ``xmax``: the result lies in
        [xmax - 2^31, xmax + 2^31). That is the window PostgreSQL itself assumes when it
        compares two 32-bit xids (it freezes rows long before an xid grows 2^31 old), and
        it is right across an epoch boundary: with xmax = 2^32 + 5, a reported 4294967290
        is the epoch-0 xid 2^32 - 6, just before the snapshot, while a reported 7 is the
        epoch-1 xid 2^32 + 7, just after it. A true 64-bit value below 2^32 (epoch 0) that
        lies inside the window is returned unchanged by the same rule, so the two widths
        need no flag to tell them apart.

        The consequence for callers: a change made more than 2^31 transactions away from
        the snapshot cannot be placed by its 32-bit xid. The hand-off only matters for
        the events around the bootstrap, which are far nearer than that.
        """
        if txid < 0:
            if txid < -_HALF_EPOCH:
                raise ValueError(f"transaction id {txid!r} is not a 32-bit or 64-bit xid")
            txid += _EPOCH
        if txid >= _EPOCH:
            if txid > _MAX_XID8:
                raise ValueError(f"transaction id {txid!r} is not a 32-bit or 64-bit xid")
            return txid

        # Signed distance from xmax's low 32 bits to the xid, in [-2^31, 2^31).
        distance = (txid - self.xmax + _HALF_EPOCH) % _EPOCH - _HALF_EPOCH
        full = self.xmax + distance
        if full < 0:
            # Before the first epoch there is nothing: the xid is an epoch-0 one above xmax.
            full += _EPOCH
        return full

    def is_visible(self, txid: int) -> bool:
        """True iff transaction ``txid`` had committed before this snapshot was taken.

        ``txid`` may be the 32-bit xid Debezium reports or a 64-bit ``xid8``; see
        ``widen``. Such a transaction's changes are contained in a bootstrap that read
        with this snapshot, so its events must be skipped.
        """
        if 0 < txid < _FIRST_NORMAL_XID:
            return True
        if txid == 0:
            raise ValueError("transaction id 0 is the invalid xid; no change carries it")

        full = self.widen(txid)
        if full < self.xmin:
            return True
        if full >= self.xmax:
            return False
        return full not in self.xip


def _parse_xid8(part: str, text: str) -> int:
    if not (part.isascii() and part.isdigit()):
        raise ValueError(f"pg_snapshot {text!r} holds {part!r}, which is not an xid8")
    value = int(part)
    if value > _MAX_XID8:
        raise ValueError(f"pg_snapshot {text!r} holds {part!r}, which is above 2^64-1")
    return value
