"""The schema migrations on a real PostgreSQL: an upgrade keeps the data and the views."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from _fastcount import IMPRESSIONS, Counters
from server import storage
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool
from tests.harness import fetch


async def at_version_2(connection: asyncpg.Connection) -> None:
    """The database as the release with migrations 1 and 2 left it."""
    await connection.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, name, sql in storage.migrations()[:2]:
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
        assert await storage.migrate(connection) == [3, 4]
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
