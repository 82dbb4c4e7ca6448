"""The BRIN indexes' page ranges, summarized by the flusher (migration 0006), which gives way to
a vacuum, to another server summarizing, and to indexes its role does not own; and the
flusher's upkeep (summarizing, pruning the ledger) failing, which the flushes shrug off."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

from _fastcount import IMPRESSIONS, Counters
from server import storage
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool
from tests.harness import fetch, insert_counts

# 20,000 rows of about 100 bytes, at the table's fillfactor of 50: ranges of 128 pages, and a
# partial one, which brin_summarize_new_values() leaves until it is full (500 pages, 3 ranges
# summarized, on PostgreSQL 15; 548 pages, 4 ranges, on 18).
KEYS = 20_000
RANGE = 128  # pages
BUCKET = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)


async def migrated(dsn: str) -> None:
    """The schema, with no autovacuum of pixel_counts to summarize or lock it meanwhile."""
    connection = await storage.connect(dsn, 10.0)
    try:
        await connection.execute("ALTER TABLE pixel_counts SET (autovacuum_enabled = off)")
    finally:
        await connection.close()


async def migrated_with_rows(dsn: str) -> int:
    """The schema and KEYS rows; how many full ranges they fill."""
    await migrated(dsn)
    await insert_counts(
        dsn, [(BUCKET, "c", "cr", f"aff-{n}", "", 1, 0, 0, 0, 0, 0) for n in range(KEYS)]
    )
    (pages,) = await fetch(dsn, "SELECT pg_relation_size('pixel_counts') / 8192")
    full: int = pages[0] // RANGE
    assert full >= 3
    return full


async def summarize_as_owner(dsn: str) -> int:
    """Summarizes what the index has left unsummarized; returns how many ranges."""
    (row,) = await fetch(dsn, "SELECT brin_summarize_new_values('pixel_counts_bucket_brin')")
    return int(row[0])


async def lossy_blocks(connection: asyncpg.Connection, bucket: datetime.datetime) -> int:
    """The heap pages a query of ``bucket`` reads through the BRIN index alone (the primary key
    set aside in a transaction rolled back): those of its summarized ranges that may hold it,
    and every page of the unsummarized."""
    await connection.execute(
        "BEGIN; ALTER TABLE pixel_counts DROP CONSTRAINT pixel_counts_pkey;"
        " SET LOCAL enable_seqscan = off; SET LOCAL max_parallel_workers_per_gather = 0"
    )
    try:
        (plan,) = orjson.loads(
            await connection.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM pixel_counts"
                " WHERE bucket = $1",
                bucket,
            )
        )
    finally:
        await connection.execute("ROLLBACK")
    (scan,) = plan["Plan"]["Plans"]
    assert scan["Node Type"] == "Bitmap Heap Scan", scan
    assert scan["Plans"][0]["Index Name"] == "pixel_counts_bucket_brin", scan
    blocks: int = scan["Lossy Heap Blocks"]
    return blocks


async def test_a_flush_summarizes_the_ranges_it_filled(database: str, tmp_path: Path) -> None:
    await migrated(database)
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    for n in range(KEYS):
        counters.add(int(BUCKET.timestamp()), "c", "cr", f"aff-{n}", "", IMPRESSIONS)
    await flusher.flush()
    await flusher.close(5.0)
    (pages,) = await fetch(database, "SELECT pg_relation_size('pixel_counts') / 8192")
    assert pages[0] >= 3 * RANGE
    (options,) = await fetch(
        database, "SELECT reloptions FROM pg_class WHERE relname = 'pixel_counts_bucket_brin'"
    )
    assert options[0] == ["autosummarize=off"]
    connection = await asyncpg.connect(database)
    try:
        # Summarized, the ranges hold no bucket before the flushed one; unsummarized, they
        # would be read for any (as the partial one is).
        assert await lossy_blocks(connection, BUCKET - datetime.timedelta(minutes=1)) < RANGE
    finally:
        await connection.close()
    assert await summarize_as_owner(database) == 0


async def test_summarizing_gives_way_to_a_vacuum_and_to_another_server(database: str) -> None:
    ranges = await migrated_with_rows(database)
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
        assert summarized is not None and summarized.not_owned == 0
        assert summarized.ranges == ranges
        assert await storage.summarize_ranges(connection) == (0, 0)
        # Its lock timeout was the transaction's alone.
        assert await connection.fetchval("SHOW lock_timeout") == "0"
    finally:
        await other.close()
        await connection.close()


async def test_a_role_that_does_not_own_the_table_leaves_its_ranges_be(database: str) -> None:
    """brin_summarize_new_values() is for an index's owner: in a session of another role the
    summarizing leaves the index alone, fails on nothing, and says how many it left."""
    ranges = await migrated_with_rows(database)
    role = "pixel_writer_" + uuid.uuid4().hex[:8]
    await fetch(database, f"CREATE ROLE {role}")
    try:
        connection = await asyncpg.connect(database)
        try:
            await connection.execute(f"SET ROLE {role}")
            assert await storage.summarize_ranges(connection) == (0, 1)
        finally:
            await connection.close()
        # Left for the owner, or a vacuum.
        assert await summarize_as_owner(database) == ranges
    finally:
        await fetch(database, f"DROP ROLE {role}")


@pytest.mark.parametrize(
    ("step", "task"),
    [("summarize_ranges", "summarize the BRIN indexes"), ("prune_ledger", "prune the ledger")],
)
async def test_a_failed_summarizing_or_pruning_leaves_the_flushes_be(
    step: str,
    task: str,
    database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The counts are applied before either; a connection it leaves in doubt is opened anew at
    the next flush, which no failure holds back."""

    async def broken(connection: asyncpg.Connection, *args: object) -> None:
        connection.terminate()  # as a connection lost mid-statement
        raise asyncpg.InterfaceError("connection is closed")

    await migrated(database)
    counters, metrics = Counters(), Metrics()
    flusher = Flusher(counters, database, metrics, 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    monkeypatch.setattr(storage, step, broken)
    counters.add(int(BUCKET.timestamp()), "c", "cr", "a", "", IMPRESSIONS, 2)
    await flusher.flush()
    assert f"cannot {task}: InterfaceError" in caplog.text
    assert not flusher.ready
    assert (
        flusher.problem == f"reconnecting: could not {task}: InterfaceError: connection is closed"
    )
    assert await fetch(database, "SELECT impressions FROM pixel_counts") == [(2,)]
    monkeypatch.undo()
    counters.add(int(BUCKET.timestamp()), "c", "cr", "a", "", IMPRESSIONS, 3)
    await flusher.flush()
    assert flusher.ready
    assert metrics.flush_failures == 0
    await flusher.close(5.0)
    rows = await fetch(database, "SELECT impressions FROM pixel_counts")
    assert [row[0] for row in rows] == [5]


async def test_no_upkeep_once_the_server_is_stopping(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush under way when a shutdown begins applies its batches and no more."""
    called: list[str] = []

    async def upkeep(connection: asyncpg.Connection, *args: object) -> None:
        called.append("upkeep")

    await migrated(database)
    monkeypatch.setattr(storage, "summarize_ranges", upkeep)
    monkeypatch.setattr(storage, "prune_ledger", upkeep)
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    counters.add(int(BUCKET.timestamp()), "c", "cr", "a", "", IMPRESSIONS, 2)
    flusher.stop()
    await flusher.flush()
    await flusher.close(5.0)
    assert called == []
    assert await fetch(database, "SELECT impressions FROM pixel_counts") == [(2,)]
