"""The schema migrations on a real PostgreSQL: an upgrade keeps the data and the views."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from _fastcount import IMPRESSIONS, Counters
from loadtests.explain_report import VIEW_INDEXES
from server import storage
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool
from tests.harness import fetch


async def at_version_2(connection: asyncpg.Connection) -> None:
    """The database as the release with migrations 1 and 2 left it."""
    await at_version(connection, 2)


async def at_version(connection: asyncpg.Connection, last: int) -> None:
    """The database as the release with migrations 1 to ``last`` left it."""
    await connection.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, name, sql in storage.migrations()[:last]:
        await connection.execute(sql)
        await connection.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
        )


async def test_upgrading_a_database_at_version_2_keeps_its_counts(database: str) -> None:
    connection = await asyncpg.connect(database)
    try:
        await at_version_2(connection)  # holding counts:
        await connection.execute(
            "INSERT INTO pixel_counts (bucket, campaign, creative, affiliate, sub_id, impressions,"
            " clicks) VALUES (to_timestamp(1800000000), 'a', 'cr', 'é', '', 10, 1),"
            " (to_timestamp(1800000000), 'B', 'cr', 'z', '', 4, 0)"
        )
        assert await storage.migrate(connection) == [3, 4, 5, 6]
        assert await storage.migrate(connection) == []
    finally:
        await connection.close()

    rows = await fetch(database, "SELECT campaign, impressions, ctr FROM pixel_hourly ORDER BY 1")
    # Byte order now: "B" (0x42) before "a" (0x61), whatever the server's default collation.
    assert [tuple(row) for row in rows] == [("B", 4, 0.0), ("a", 10, 0.1)]
    (options,) = await fetch(
        database, "SELECT reloptions FROM pg_class WHERE relname = $1", "pixel_counts"
    )
    assert options[0] == ["fillfactor=50"]
    collations = await fetch(
        database,
        "SELECT attname, collname FROM pg_attribute JOIN pg_collation c ON c.oid = attcollation"
        " WHERE attrelid = 'pixel_counts'::regclass AND attnum > 0 ORDER BY attnum",
    )
    assert [tuple(row) for row in collations] == [
        ("campaign", "C"),
        ("creative", "C"),
        ("affiliate", "C"),
        ("sub_id", "C"),
    ]


async def test_a_migration_the_database_refuses_is_reported_as_such(
    database: str, tmp_path: Path
) -> None:
    """Migration 3 changes the columns the views read: an operator's view on one of them
    makes PostgreSQL refuse it. The flusher says so, at ERROR, and is not ready; once the
    operator drops the view, the migration runs and the counts land."""
    connection = await asyncpg.connect(database)
    try:
        await at_version_2(connection)
        await connection.execute("CREATE VIEW my_daily AS SELECT * FROM pixel_daily")
    finally:
        await connection.close()
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 20), 10, 2)
    counters.add(60, "kept", "", "", "", IMPRESSIONS, 3)
    await flusher.flush()
    assert not flusher.ready
    assert "schema migration 3 (faster_merges) failed: DependentObjectsStillExistError" in (
        flusher.problem
    )
    assert "unreachable" not in flusher.problem
    await fetch(database, "DROP VIEW my_daily")
    await flusher.close(5.0)
    rows = await fetch(database, "SELECT campaign, impressions FROM pixel_counts")
    assert [tuple(row) for row in rows] == [("kept", 3)]


async def test_the_views_filtered_by_hour_or_day_can_read_only_those_pages(
    database: str,
) -> None:
    """With the README's indexes, an operator's ``WHERE day = ...`` on the views is served by
    them (before migration 5 no index could be made for it on PostgreSQL 15); the hours and
    days are UTC's whatever the session's time zone, over all of timestamptz, and an
    operator's view on top of them stays through the upgrade."""
    connection = await asyncpg.connect(database)
    try:
        await at_version(connection, 4)
        await connection.execute("CREATE VIEW my_daily AS SELECT day, impressions FROM pixel_daily")
        await connection.execute(
            "INSERT INTO pixel_counts (bucket, campaign, creative, affiliate, sub_id, impressions)"
            " SELECT timestamptz '2024-05-01 00:00+00' + n * interval '1 minute', 'c', '', '',"
            " '', 1 FROM generate_series(0, 3 * 1440 - 1) n"
        )
        assert await storage.migrate(connection) == [5, 6]
        await connection.execute(VIEW_INDEXES)
        await connection.execute(
            "INSERT INTO pixel_counts (bucket, campaign, creative, affiliate, sub_id, impressions)"
            " VALUES ('4714-11-24 00:00:00+00 BC', 'first', '', '', '', 1),"
            " ('294276-12-31 23:59:59+00', 'last', '', '', '', 1)"
        )
        ends = await connection.fetch(
            "SELECT day::text AS shown FROM pixel_daily WHERE campaign <> 'c' ORDER BY day"
        )
        assert [row[0] for row in ends] == [
            "4714-11-24 00:00:00+00 BC",
            "294276-12-31 00:00:00+00",
        ]
        await connection.execute("DELETE FROM pixel_counts WHERE campaign <> 'c'")
        await connection.execute("SET TimeZone = 'America/New_York'")
        days = await connection.fetch("SELECT day, impressions FROM my_daily ORDER BY 1")
        # Three UTC days (New York's would be four, from 8 pm to 8 pm).
        assert [(row["day"].isoformat(), row["impressions"]) for row in days] == [
            ("2024-05-01T00:00:00+00:00", 1440),
            ("2024-05-02T00:00:00+00:00", 1440),
            ("2024-05-03T00:00:00+00:00", 1440),
        ]
        hours = await connection.fetchval(
            "SELECT count(*) FROM pixel_hourly WHERE extract(minute FROM hour) = 0"
            " AND hour >= timestamptz '2024-05-02 00:00+00'"
        )
        assert hours == 48
        await connection.execute("SET enable_seqscan = off")  # a small table: ask for the plan
        for view, column, index in (
            ("pixel_daily", "day", "pixel_counts_day_brin"),
            ("pixel_hourly", "hour", "pixel_counts_hour_brin"),
        ):
            plan = await connection.fetchval(
                f"EXPLAIN (FORMAT JSON) SELECT * FROM {view}"
                f" WHERE {column} >= timestamptz '2024-05-02 00:00+00'"
            )
            assert f'"Index Name": "{index}"' in plan, plan
    finally:
        await connection.close()
