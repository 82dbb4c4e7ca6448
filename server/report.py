"""The operator's questions of ``pixel_counts``: sums and rates over a time range, grouped by
dimensions and by hour or day, sorted, top N. ``pixel-server report`` and the operator page ask
them here.

Every query reads one range of buckets, which the primary key ``(bucket, ...)`` serves; the
README shows the plans on 10 million rows (``loadtests/explain_report.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

# What a report can group by: the name, and its SQL over pixel_counts.
DIMENSIONS: dict[str, str] = {
    "campaign": "campaign",
    "creative": "creative",
    "affiliate": "affiliate",
    "sub_id": "sub_id",
    "hour": "date_trunc('hour', bucket, 'UTC')",
    "day": "date_trunc('day', bucket, 'UTC')",
}
TIMES = ("hour", "day")
# The columns of every report, after its dimensions: the sums and the rates of the funnel.
MEASURES: dict[str, str] = {
    "impressions": "sum(impressions)::bigint",
    "givt_impressions": "sum(givt_impressions)::bigint",
    "measurable": "sum(measurable)::bigint",
    "viewable": "sum(viewable)::bigint",
    "viewability_rate": "sum(viewable)::float8 / nullif(sum(measurable), 0)",
    "clicks": "sum(clicks)::bigint",
    "givt_clicks": "sum(givt_clicks)::bigint",
    "ctr": "sum(clicks)::float8 / nullif(sum(impressions), 0)",
}
RATES = ("viewability_rate", "ctr")

Value = str | int | float | None


@dataclasses.dataclass(frozen=True)
class Query:
    """One report: the buckets that start in ``[start, end)``, grouped ``by`` (none: one row
    of totals), optionally only where a dimension has a value (``filters``).

    The order: ``sort`` (descending for measures, ascending for dimensions, unless
    ``descending`` says otherwise), else hour or day first and then impressions, highest first;
    ties go in the order of the dimensions. ``top`` keeps the first rows.
    """

    start: datetime
    end: datetime
    by: tuple[str, ...] = ("campaign",)
    sort: str | None = None
    descending: bool | None = None
    top: int | None = None
    filters: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = [name for name in self.by if name not in DIMENSIONS]
        if unknown:
            raise ValueError(f"cannot group by {', '.join(unknown)}")
        if len(set(self.by)) != len(self.by):
            raise ValueError("a dimension is given twice")
        if self.sort is not None and self.sort not in self.columns:
            raise ValueError(f"cannot sort by {self.sort}: columns are {', '.join(self.columns)}")
        if self.top is not None and self.top < 1:
            raise ValueError("top must be at least 1")
        if not self.start < self.end:
            raise ValueError(f"the range is empty: {self.start} is not before {self.end}")
        for dimension, _ in self.filters:
            if dimension not in DIMENSIONS or dimension in TIMES:
                raise ValueError(f"cannot filter by {dimension}")

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.by, *MEASURES)

    def sql(self) -> tuple[str, list[Any]]:
        """The statement and its parameters."""
        params: list[Any] = [self.start, self.end]
        where = ["bucket >= $1", "bucket < $2"]
        for dimension, value in self.filters:
            params.append(value)
            where.append(f"{dimension} = ${len(params)}")
        select = [f"{DIMENSIONS[name]} AS {name}" for name in self.by]
        select += [f"{sql} AS {name}" for name, sql in MEASURES.items()]
        if self.by:
            group = "GROUP BY " + ", ".join(str(n) for n in range(1, len(self.by) + 1))
        else:
            group = "HAVING count(*) > 0"  # no row at all for an empty range
        sql = (
            f"SELECT {', '.join(select)}\nFROM pixel_counts\nWHERE {' AND '.join(where)}\n"
            f"{group}\nORDER BY {self._order()}"
        )
        if self.top is not None:
            params.append(self.top)
            sql += f"\nLIMIT ${len(params)}"
        return sql, params

    def _order(self) -> str:
        if self.sort is None:
            keys = [(name, False) for name in self.by if name in TIMES]
            keys.append(("impressions", True))
        else:
            descending = self.sort in MEASURES if self.descending is None else self.descending
            keys = [(self.sort, descending)]
        keys += [(name, False) for name in self.by if name not in dict(keys)]
        return ", ".join(
            f"{name} {'DESC' if descending else 'ASC'} NULLS LAST" for name, descending in keys
        )


async def fetch(connection: Any, query: Query) -> list[tuple[Value, ...]]:
    """The report's rows, one value per column: dimension values as text (hours and days as
    ISO 8601 UTC), sums as integers, rates as floats (``None`` where nothing to divide by)."""
    sql, params = query.sql()
    records = await connection.fetch(sql, *params)
    return [tuple(_value(name, record[name]) for name in query.columns) for record in records]


def _value(column: str, value: Any) -> Value:
    if column == "hour":
        return iso_utc(value)
    if column == "day":
        return value.astimezone(UTC).date().isoformat()  # type: ignore[no-any-return]
    return value  # type: ignore[no-any-return]


def iso_utc(moment: datetime) -> str:
    """``2024-05-01T13:00:00Z``: an aware datetime in UTC, to the second."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_dicts(columns: Sequence[str], rows: Sequence[tuple[Value, ...]]) -> list[dict[str, Value]]:
    return [dict(zip(columns, row, strict=True)) for row in rows]
