"""The plans of the report's queries on a big ``pixel_counts``.

Fills a scratch database with generated rows (10 million by default: 30 days of one-minute
buckets, about 230 keys each, out of 40 campaigns, 1,000 creatives, 200 affiliates and 5
sub-ids), then prints ``EXPLAIN (ANALYZE, BUFFERS)`` of what ``pixel-server report`` and the
operator page ask, each run once to warm the cache and once measured, and what applying a flush
batch of new rows costs. It prints; it asserts nothing.

    .venv/bin/python -m loadtests.explain_report --rows 10000000 --days 30
    .venv/bin/python -m loadtests.explain_report --rows 10000000 --days 30 --no-brin  # before

Without ``--dsn`` it runs on an embedded PostgreSQL in a temporary folder, removed after.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from _fastcount import IMPRESSIONS, MEASURABLE, VIEWABLE, Counters
from server import dashboard, storage
from server.batch import Batch, seal_window
from server.embedded import EmbeddedPostgres
from server.report import Query

# What flush_cost merges: batches of new keys, as a minute of wide traffic makes them.
FLUSH_ROWS = 20_000
FLUSH_BATCHES = 10
# Keys of a bucket are distinct: k = (position * STRIDE + bucket * 17) mod KEY_SPACE, with
# position * STRIDE < KEY_SPACE.
KEY_SPACE = 1_000_000
STRIDE = 4099

_GENERATE = """
INSERT INTO pixel_counts
SELECT $1::timestamptz + (i / $2) * interval '1 minute',
       'campaign-' || (k % 40), 'creative-' || (k / 40 % 25), 'affiliate-' || (k / 1000 % 200),
       'sub-' || (k / 200000),
       n, n % 3, n * 9 / 10, n * 6 / 10, n / 40, n % 2
FROM (SELECT i, ((i % $2) * $3 + (i / $2) * 17) % $4 AS k, 1 + (i * 7919) % 97 AS n
      FROM generate_series($5::bigint, $6::bigint - 1) AS i) AS generated
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument(
        "--dsn", help="a database to work in, in a schema of its own (default: embedded)"
    )
    parser.add_argument(
        "--no-brin", action="store_true", help="drop the BRIN index first: the plans without it"
    )
    parser.add_argument(
        "--view-indexes",
        action="store_true",
        help="add the README's BRIN indexes on the views' hours and days",
    )
    args = parser.parse_args()
    if args.dsn:
        asyncio.run(explain(args.dsn, args.rows, args.days, args.no_brin, args.view_indexes))
        return
    with tempfile.TemporaryDirectory(prefix="pixel-explain-") as folder:
        postgres = EmbeddedPostgres(Path(folder))
        postgres.start()
        try:
            asyncio.run(
                explain(postgres.dsn, args.rows, args.days, args.no_brin, args.view_indexes)
            )
        finally:
            postgres.stop()


async def explain(dsn: str, rows: int, days: int, no_brin: bool, view_indexes: bool) -> None:
    """Works in a schema of its own, dropped at the end, so any database will do."""
    schema = "pixel_explain_" + uuid.uuid4().hex[:8]
    connection = await asyncpg.connect(dsn, command_timeout=None)
    try:
        await connection.execute(f"CREATE SCHEMA {schema}; SET search_path = {schema}")
        end = await generate(connection, rows, days)
        if no_brin:
            await connection.execute("DROP INDEX pixel_counts_bucket_brin")
        if view_indexes:
            await connection.execute(VIEW_INDEXES)
        print(await connection.fetchval("SELECT version()"))
        for setting in ("shared_buffers", "work_mem", "max_parallel_workers_per_gather"):
            print(f"{setting} = {await connection.fetchval(f'SHOW {setting}')}")
        indexes = await connection.fetch(
            "SELECT indexname, pg_size_pretty(pg_relation_size(indexname::regclass))"
            " FROM pg_indexes WHERE tablename = 'pixel_counts' AND schemaname = $1",
            schema,
        )
        print("indexes:", ", ".join(f"{name} ({size})" for name, size in indexes))
        for title, sql, params in queries(end):
            await show(connection, title, sql, params)
        # The flusher's own connection: migrations (none left to apply) and its staging table.
        await flush_cost(f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}", end)
    finally:
        await connection.execute(f"DROP SCHEMA {schema} CASCADE")
        await connection.close()


async def flush_cost(dsn: str, end: datetime) -> None:
    """Merges batches of FLUSH_ROWS new keys, one minute each after the data, as the flusher
    does; prints the median time."""
    connection = await storage.connect(dsn, timeout=10)
    try:
        seconds = []
        for minute in range(FLUSH_BATCHES):
            bucket = int((end + timedelta(minutes=minute)).timestamp())
            counters = Counters(max_keys=FLUSH_ROWS)
            for k in range(FLUSH_ROWS):
                key = (bucket, f"c{k % 40}", f"cr{k % 1000}", f"a{k % 200}", f"s{k}")
                for field in (IMPRESSIONS, MEASURABLE, VIEWABLE):
                    counters.add(*key, field)
            batches: list[Batch] = []
            seal_window(counters.swap(), batches.append)
            began = time.perf_counter()
            for batch in batches:
                await storage.apply(connection, batch)
            seconds.append(time.perf_counter() - began)
    finally:
        await connection.close()
    median = statistics.median(seconds) * 1000
    print(f"\n=== a flush batch of {FLUSH_ROWS:,} new rows applied: {median:.1f} ms (median)")


async def generate(connection: Any, rows: int, days: int) -> datetime:
    """Fills pixel_counts; returns the end of the data (its "now")."""
    await storage.migrate(connection)
    buckets = days * 24 * 60
    per_bucket = math.ceil(rows / buckets)
    if per_bucket * STRIDE >= KEY_SPACE:
        raise SystemExit(f"at most {KEY_SPACE // STRIDE * buckets} rows over {days} days")
    start = datetime(2024, 5, 1, tzinfo=UTC)
    began = time.perf_counter()
    step = 1_000_000
    for first in range(0, rows, step):
        await connection.execute(
            _GENERATE, start, per_bucket, STRIDE, KEY_SPACE, first, min(rows, first + step)
        )
    await connection.execute("VACUUM (ANALYZE) pixel_counts")
    size = await connection.fetchval(
        "SELECT pg_size_pretty(pg_table_size('pixel_counts')) || ' table, '"
        " || pg_size_pretty(pg_indexes_size('pixel_counts')) || ' indexes'"
    )
    took = time.perf_counter() - began
    print(f"{rows:,} rows, {per_bucket} keys per bucket, {size}, made in {took:.0f} s")
    last = await connection.fetchval("SELECT max(bucket) FROM pixel_counts")
    return last + timedelta(minutes=1)  # type: ignore[no-any-return]


def queries(end: datetime) -> Iterator[tuple[str, str, list[Any]]]:
    day, week = timedelta(days=1), timedelta(days=7)
    reports = (
        ("report --since 24h", Query(end - day, end)),
        ("report --since 24h --by hour", Query(end - day, end, by=("hour",))),
        (
            "report --since 24h --by campaign --by creative --top 20",
            Query(end - day, end, by=("campaign", "creative"), top=20),
        ),
        (
            "report --since 7d --by affiliate --sort ctr --top 20",
            Query(end - week, end, by=("affiliate",), sort="ctr", top=20),
        ),
        (
            "report --since 7d --campaign campaign-7 --by day",
            Query(end - week, end, by=("day",), filters=(("campaign", "campaign-7"),)),
        ),
        ("report --since 30d --by campaign", Query(end - 30 * day, end)),
    )
    for title, query in reports:
        sql, params = query.sql()
        yield title, sql, params
    six_hours = end - timedelta(hours=6)
    step = timedelta(seconds=dashboard.choose_step(6, 60))
    yield "operator page, 6 h: the chart and totals", dashboard.SERIES, [six_hours, end, step]
    yield "operator page, 6 h: the top lists", dashboard.TOP_LISTS, [six_hours, end, dashboard.TOP]
    # The README's SQL example on the operators' view: affiliates by reach, yesterday.
    yesterday = end.replace(hour=0, minute=0, second=0, microsecond=0) - day
    yield "pixel_daily, yesterday's affiliates", YESTERDAYS_AFFILIATES, [yesterday]


# The indexes the README offers operators who filter the views by hour or day, and the
# statistics of their expressions, without which the planner does not choose them.
VIEW_INDEXES = """
CREATE INDEX pixel_counts_hour_brin ON pixel_counts
    USING brin ((date_trunc('hour', bucket AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'))
    WITH (autosummarize = off);
CREATE INDEX pixel_counts_day_brin ON pixel_counts
    USING brin ((date_trunc('day', bucket AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'))
    WITH (autosummarize = off);
ANALYZE pixel_counts;
"""
YESTERDAYS_AFFILIATES = """
SELECT affiliate, sum(impressions) AS impressions
FROM pixel_daily WHERE day = $1
GROUP BY affiliate ORDER BY impressions DESC LIMIT 20
"""


async def show(connection: Any, title: str, sql: str, params: list[Any]) -> None:
    statement = f"EXPLAIN (ANALYZE, BUFFERS) {sql}"
    await connection.fetch(statement, *params)  # warms the cache
    plan = [row[0] for row in await connection.fetch(statement, *params)]
    executed = next((line for line in plan if line.startswith("Execution Time")), "")
    print(f"\n=== {title}: {re.sub(r'Execution Time: ', '', executed)}")
    print("\n".join(plan))


if __name__ == "__main__":
    main()
