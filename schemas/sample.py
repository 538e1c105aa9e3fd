"""Realistic sample rows for the demo source: what a multi-tenant calculation engine stores.

Rows come out as the PostgreSQL text form of each column (``str``, or ``None`` for NULL), in
the column order of the dataset minus its version column, which the database assigns. The
same form feeds ``COPY`` (seeding) and query parameters (churn), and leaves every value
exact: numerics keep their scale, timestamps carry their offsets, and text includes emoji,
non-Latin scripts, backslashes and control characters such as tab and newline.

Generation is deterministic: ``SampleRows(dataset, client_id, seed)`` yields the same rows for
the same arguments, whatever order targets are generated in.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from datetime import date, timedelta

from schemas.datasets import Dataset, get_dataset

Row = tuple[str | None, ...]

_CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF", "CNY", "INR", "BRL", "SEK", "ZAR")
_KINDS = ("company", "fund", "portfolio", "desk", "account", "legal entity", "branch")
_UNITS = ("EUR", "USD", "%", "bp", "shares", "t CO₂e", "m²", "€/MWh", "FTE", "¥")
_WORDS = (
    "Revenue",
    "Umsatz",
    "Chiffre d’affaires",
    "Выручка",
    "売上高",
    "营业收入",
    "매출",
    "الإيرادات",
    "הכנסות",
    "Gelir",
    "Έσοδα",
    "राजस्व",
    "Zürich Holding",
    "Ñandú S.A.",
    "Østerbro ApS",
    "Łódź Sp. z o.o.",
    "Provision \\ reserve",
    "tab\tseparated",
    "two\nlines",
    "carriage\rreturn",
    "bell\x07 and escape\x1b",
    "quote \" and 'apostrophe'",
    "rocket 🚀",
    "family 👨‍👩‍👧‍👦",
    "flag 🇯🇵",
    "math 𝔸𝔹ℂ ∑∫√",
    "zero\u200bwidth",
    "combining é vs é",
)
_EXPRESSIONS = (
    "sum(revenue) - sum(cost)",
    "ebitda / nullif(revenue, 0)",
    "round(value * fx_rate, 2)",
    "if(period >= date '2020-01-01', a * 1.05, a)",
    "coalesce(override, base) * (1 + growth)^years",
    "Σ(x_i · w_i) / Σ(w_i)",
    "max(0, exposure - collateral)\t-- net",
    "λ * volatility²",
    'lookup("税率", jurisdiction) * profit',
    "case\n  when risk > 0.8 then 'high'\n  else 'low'\nend",
    "path \\\\server\\share",
)
_DATES = tuple(
    (date(2012, 1, 31) + timedelta(days=step)).isoformat() for step in range(0, 15 * 365, 3)
)
_OFFSETS = ("+00", "+00", "+00", "+01", "+02", "-05", "-08", "+05:30", "+09", "-03:30", "+13:45")


def _json_documents(rng: random.Random, count: int) -> tuple[str, ...]:
    documents = []
    for index in range(count):
        document: dict[str, object] = {
            "source": rng.choice(("ERP", "ledger", "manual", "import", "API")),
            "label": rng.choice(_WORDS),
            "tags": rng.sample(("ifrs", "gaap", "budget", "actual", "forecast", "🔒"), 2),
            "limits": {"min": -rng.randint(0, 10**6), "max": rng.randint(0, 10**12)},
            "ratio": round(rng.uniform(-1, 1), 6),
            "approved": rng.random() < 0.5,
            "note": None if index % 3 else "préliminaire ✓",
        }
        if index % 5 == 0:
            document["history"] = [{"v": step, "by": rng.choice(_WORDS)} for step in range(3)]
        documents.append(json.dumps(document, ensure_ascii=index % 2 == 0))
    return tuple(documents)


class SampleRows:
    """Rows of one target: ``rows(first_id, count)`` gives ids first_id, first_id+1, ..."""

    def __init__(self, dataset: Dataset | str, client_id: int, seed: int = 0) -> None:
        self.dataset = get_dataset(dataset) if isinstance(dataset, str) else dataset
        self.client_id = client_id
        self.client_text = str(client_id)
        # A string seed is hashed by random.Random itself, the same on every run and platform.
        self.rng = random.Random(f"{seed}:{self.dataset.name}:{client_id}")
        self.json_documents = _json_documents(random.Random(f"{seed}:json"), 256)
        self._make: Callable[[int], Row] = getattr(self, f"_{self.dataset.name}")

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns each row gives values for: every column but the version column."""
        return tuple(
            name for name in self.dataset.column_names if name != self.dataset.version_column
        )

    def rows(self, first_id: int, count: int) -> Iterator[Row]:
        make = self._make
        for key in range(first_id, first_id + count):
            yield make(key)

    def row(self, key: int) -> Row:
        return self._make(key)

    # Building blocks: each draws from self.rng and returns PostgreSQL text.

    def _pick(self, values: Sequence[str]) -> str:
        return values[int(self.rng.random() * len(values))]

    def _maybe(self, share_null: float, value: str) -> str | None:
        return None if self.rng.random() < share_null else value

    def _numeric(self, integer_digits: int, scale: int) -> str:
        # Magnitudes spread over many orders, as amounts do: cents to trillions.
        rng = self.rng
        integer = int(10 ** (rng.random() * integer_digits)) - 1
        fraction = int(rng.random() * 10**scale)
        sign = "-" if rng.random() < 0.2 else ""
        return f"{sign}{integer}.{fraction:0{scale}d}"

    def _timestamp(self) -> str:
        rng = self.rng
        seconds = int(rng.random() * 86400)
        micros = int(rng.random() * 1_000_000)
        clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        return f"{self._pick(_DATES)} {clock}.{micros:06d}{self._pick(_OFFSETS)}"

    def _name(self, key: int) -> str:
        return f"{self._pick(_WORDS)} {key}"

    def _json(self, share_null: float) -> str | None:
        return self._maybe(share_null, self._pick(self.json_documents))

    def _bool(self, share_true: float = 0.5) -> str:
        return "t" if self.rng.random() < share_true else "f"

    def _ref(self, upper: int) -> str:
        return str(1 + int(self.rng.random() * upper))

    # One method per dataset, columns in the dataset's order.

    def _raw_data(self, key: int) -> Row:
        return (
            str(key),
            self.client_text,
            self._ref(2_000),
            self._ref(500),
            self._pick(_DATES),
            self._maybe(0.08, self._numeric(14, 6)),
            self._maybe(0.05, self._pick(_CURRENCIES)),
            self._timestamp(),
        )

    def _entities(self, key: int) -> Row:
        parent = None if key == 1 or self.rng.random() < 0.1 else self._ref(key - 1)
        return (
            str(key),
            self.client_text,
            parent,
            self._name(key),
            self._pick(_KINDS),
            self._json(0.2),
            self._bool(0.9),
            self._pick(_DATES),
            self._timestamp(),
        )

    def _data_items(self, key: int) -> Row:
        return (
            str(key),
            self.client_text,
            f"DI-{key:07d}",
            self._name(key),
            self._maybe(0.15, self._pick(_UNITS)),
            str(int(self.rng.random() * 9)),
            self._bool(0.6),
            self._json(0.3),
            self._timestamp(),
        )

    def _formulas(self, key: int) -> Row:
        first = int(self.rng.random() * (len(_DATES) - 1))
        last = first + 1 + int(self.rng.random() * (len(_DATES) - first - 1))
        return (
            str(key),
            self.client_text,
            self._name(key),
            self._pick(_EXPRESSIONS),
            self._maybe(0.1, self._numeric(10, 8)),
            _DATES[first],
            self._maybe(0.6, _DATES[last]),
            self._bool(0.85),
            self._json(0.25),
            self._timestamp(),
        )

    def _formula_associations(self, key: int) -> Row:
        return (
            str(key),
            self.client_text,
            self._ref(5_000),
            self._ref(2_000),
            self._maybe(0.3, self._ref(500)),
            str(int(self.rng.random() * 200) - 100),
            self._maybe(0.15, self._numeric(8, 4)),
            self._pick(_DATES),
            self._timestamp(),
        )

    # What churn changes in an existing row: a few value columns, as real edits do.

    def changed_values(self) -> dict[str, str | None]:
        """New values for the columns an update of this dataset sets."""
        name = self.dataset.name
        if name == "raw_data":
            return {
                "value": self._maybe(0.08, self._numeric(14, 6)),
                "recorded_at": self._timestamp(),
            }
        if name == "entities":
            return {"attributes": self._json(0.2), "active": self._bool(0.9)}
        if name == "data_items":
            return {"metadata": self._json(0.3), "decimals": str(int(self.rng.random() * 9))}
        if name == "formulas":
            return {
                "weight": self._maybe(0.1, self._numeric(10, 8)),
                "expression": self._pick(_EXPRESSIONS),
            }
        return {
            "factor": self._maybe(0.15, self._numeric(8, 4)),
            "priority": str(int(self.rng.random() * 200) - 100),
        }


def client_row_counts(clients: Sequence[int], rows_per_client: int, skew: float) -> dict[int, int]:
    """Rows per client: ``rows_per_client`` on average, shared like real tenants' sizes.

    The i-th client (from 1) gets a share proportional to 1 / i**skew, a power law: skew 0
    gives every client the same count, skew 1 makes the first client about as large as the
    next several together. The total is exactly ``len(clients) * rows_per_client``.
    """
    if not clients:
        return {}
    weights = [1.0 / (rank**skew) for rank in range(1, len(clients) + 1)]
    total = rows_per_client * len(clients)
    scale = total / sum(weights)
    exact = [weight * scale for weight in weights]
    counts = [int(value) for value in exact]

    # Largest remainders take the rows rounding left over, so the total is exact.
    short = total - sum(counts)
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for index in by_remainder[:short]:
        counts[index] += 1
    return dict(zip(clients, counts, strict=True))
