"""Accounting: what a load run saw answered, against what reached ``pixel_counts``."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import asyncpg

from _fastcount import COLUMNS

Key = tuple[str, str, str, str]


async def totals_by_key(dsn: str) -> dict[Key, tuple[int, ...]]:
    """The counters of ``pixel_counts`` summed per (campaign, creative, affiliate, sub_id)
    over all buckets, in the order of ``_fastcount.COLUMNS``."""
    sums = ", ".join(f"sum({column})::bigint" for column in COLUMNS)
    connection: Any = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            f"SELECT campaign, creative, affiliate, sub_id, {sums} FROM pixel_counts"
            " GROUP BY 1, 2, 3, 4"
        )
    finally:
        await connection.close()
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


@dataclasses.dataclass(frozen=True)
class Reconciliation:
    """Sent against stored for one counter: ``missing`` were answered but not stored,
    ``extra`` stored beyond what was answered (counted twice, or never sent)."""

    sent: int
    stored: int
    missing: int
    extra: int

    @property
    def exact(self) -> bool:
        return self.missing == 0 and self.extra == 0


def reconcile(sent: collections.Counter[Key], stored: dict[Key, int]) -> Reconciliation:
    missing = sum(max(0, count - stored.get(key, 0)) for key, count in sent.items())
    extra = sum(max(0, count - sent.get(key, 0)) for key, count in stored.items())
    return Reconciliation(sum(sent.values()), sum(stored.values()), missing, extra)
