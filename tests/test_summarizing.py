"""The BRIN index's page ranges, summarized by the flusher (migration 0006), which gives way to a
vacuum, to another server summarizing, and to indexes its role does not own."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from _fastcount import IMPRESSIONS, Counters
from server import storage
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool
from tests.harness import fetch, insert_counts

KEYS = 20_000  # about five ranges of 128 pages, at the table's fillfactor of 50
BUCKET = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)


def as_role(dsn: str, role: str) -> str:
    """The DSN, for ``role`` (the test servers trust their local connections)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))


async def unsummarized(dsn: str) -> int:
    """Summarizes what the index has left unsummarized, as its owner; returns how many ranges."""
    (row,) = await fetch(dsn, "SELECT brin_summarize_new_values('pixel_counts_bucket_brin')")
    return int(row[0])


async def migrated_with_rows(dsn: str) -> None:
    connection = await storage.connect(dsn, 10.0)
    await connection.close()
    await insert_counts(
        dsn, [(BUCKET, "c", "cr", f"aff-{n}", "", 1, 0, 0, 0, 0, 0) for n in range(KEYS)]
    )


async def test_a_flush_summarizes_the_ranges_it_filled(database: str, tmp_path: Path) -> None:
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    for n in range(KEYS):
        counters.add(int(BUCKET.timestamp()), "c", "cr", f"aff-{n}", "", IMPRESSIONS)
    await flusher.flush()
    await flusher.close(5.0)
    (pages,) = await fetch(database, "SELECT pg_relation_size('pixel_counts') / 8192")
    assert pages[0] >= 3 * 128
    assert await unsummarized(database) == 0
    (options,) = await fetch(
        database, "SELECT reloptions FROM pg_class WHERE relname = 'pixel_counts_bucket_brin'"
    )
    assert options[0] == ["autosummarize=off"]
    # The summaries are right: read through the BRIN index alone (the primary key set aside in
    # a transaction rolled back), the bucket holds every key.
    connection = await asyncpg.connect(database)
    try:
        await connection.execute(
            "BEGIN; ALTER TABLE pixel_counts DROP CONSTRAINT pixel_counts_pkey;"
            " SET LOCAL enable_seqscan = off"
        )
        query = "SELECT count(*) FROM pixel_counts WHERE bucket = $1"
        plan = await connection.fetchval(f"EXPLAIN (FORMAT JSON) {query}", BUCKET)
        assert '"Index Name": "pixel_counts_bucket_brin"' in plan, plan
        assert await connection.fetchval(query, BUCKET) == KEYS
    finally:
        await connection.execute("ROLLBACK")
        await connection.close()


async def test_summarizing_gives_way_to_a_vacuum_and_to_another_server(database: str) -> None:
    await migrated_with_rows(database)
    connection = await asyncpg.connect(database, command_timeout=30)  # were it to wait instead
    other = await asyncpg.connect(database)
    try:
        # A vacuum holds this lock while it runs.
        async with other.transaction():
            await other.execute("LOCK TABLE pixel_counts IN SHARE UPDATE EXCLUSIVE MODE")
            assert await storage.summarize_ranges(connection) is None
        await other.execute("SELECT pg_advisory_lock($1)", storage.SUMMARIZING_LOCK)
        assert await storage.summarize_ranges(connection) is None
        await other.execute("SELECT pg_advisory_unlock($1)", storage.SUMMARIZING_LOCK)
        summarized = await storage.summarize_ranges(connection)
        assert summarized is not None and summarized >= 4
        assert await storage.summarize_ranges(connection) == 0
    finally:
        await other.close()
        await connection.close()


async def test_a_role_that_does_not_own_the_table_leaves_its_ranges_be(database: str) -> None:
    """brin_summarize_new_values() is for an index's owner: a flusher whose role may only write
    the counts (its tables made by another) summarizes nothing, and fails on nothing."""
    await migrated_with_rows(database)
    role = "pixel_writer_" + uuid.uuid4().hex[:8]
    await fetch(database, f"CREATE ROLE {role} LOGIN")
    try:
        await fetch(database, f"GRANT SELECT, INSERT, UPDATE ON pixel_counts TO {role}")
        connection = await asyncpg.connect(as_role(database, role))
        try:
            assert await connection.fetchval("SELECT current_user") == role
            assert await storage.summarize_ranges(connection) == 0
        finally:
            await connection.close()
        assert await unsummarized(database) >= 4  # left for the owner, or a vacuum
    finally:
        await fetch(database, f"DROP OWNED BY {role}")
        await fetch(database, f"DROP ROLE {role}")
