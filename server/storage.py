"""PostgreSQL: the schema migrations and the merge of flush batches into ``pixel_counts``."""

from __future__ import annotations

import datetime
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from _fastcount import COLUMNS as COUNT_COLUMNS
from server.batch import COPY_HEADER, COPY_TRAILER, POSTGRES_EPOCH, Batch

log = logging.getLogger(__name__)

# Serialises migrations between processes and instances sharing one database.
_MIGRATION_LOCK = 0x70697865  # "pixe"
_PRUNING_LOCK = 0x6C656467  # "ledg"

# Every statement ends within this, so a hung database never holds the flusher forever.
COMMAND_TIMEOUT = 60.0

# pixel_counts' columns, in the order of a batch's COPY tuples.
TABLE_COLUMNS = ("bucket", "campaign", "creative", "affiliate", "sub_id", *COUNT_COLUMNS)

_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS pixel_staging (
    bucket timestamptz, campaign text, creative text, affiliate text, sub_id text,
    impressions bigint, givt_impressions bigint, measurable bigint, viewable bigint,
    clicks bigint, givt_clicks bigint
) ON COMMIT DELETE ROWS
"""

# One statement merges the whole batch. Its keys are distinct (one window's rows), and they come
# in key order, the order of the primary key: the engine sorts them, COPY stores them in that
# order, and the staging table, being temporary, is scanned in it. So the inserts walk the index
# in order, and concurrent writers lock rows in one order and never deadlock. (Were the order
# ever lost, the worst case is a deadlock, which PostgreSQL breaks and the flusher retries.)
_MERGE = """
INSERT INTO pixel_counts AS c (bucket, campaign, creative, affiliate, sub_id, impressions,
                               givt_impressions, measurable, viewable, clicks, givt_clicks)
SELECT bucket, campaign, creative, affiliate, sub_id, impressions,
       givt_impressions, measurable, viewable, clicks, givt_clicks
FROM pixel_staging
ON CONFLICT (bucket, campaign, creative, affiliate, sub_id) DO UPDATE SET
    impressions      = c.impressions      + excluded.impressions,
    givt_impressions = c.givt_impressions + excluded.givt_impressions,
    measurable       = c.measurable       + excluded.measurable,
    viewable         = c.viewable         + excluded.viewable,
    clicks           = c.clicks           + excluded.clicks,
    givt_clicks      = c.givt_clicks      + excluded.givt_clicks
"""


def migrations() -> list[tuple[int, str, str]]:
    """The packaged migrations as (version, name, sql), in version order."""
    files = importlib.resources.files("server.migrations")
    found = []
    for entry in files.iterdir():
        if entry.name.endswith(".sql"):
            version, _, name = entry.name.removesuffix(".sql").partition("_")
            found.append((int(version), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


class MigrationError(Exception):
    """A schema migration PostgreSQL refused: a fault for the operator to mend (an object of
    theirs that depends on what the migration changes, say), not an outage."""


# SQLSTATE classes of a database that is away, busy or read-only, not of a migration it
# refuses: connection exceptions, read-only transactions, deadlocks and serialization failures,
# insufficient resources, locks not available, operator intervention, system errors.
_OUTAGE_CLASSES = {"08", "25", "40", "53", "55", "57", "58"}
# A migration may rebuild a table or an index of years of counts: far longer than a flush's
# statements may take.
MIGRATION_TIMEOUT = 3600.0


async def migrate(connection: Any) -> list[int]:
    """Applies the migrations the database lacks; returns the versions applied. A migration
    PostgreSQL refuses is a :class:`MigrationError` naming it."""
    applied: list[int] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in await connection.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            try:
                await connection.execute(sql, timeout=MIGRATION_TIMEOUT)
            except asyncpg.PostgresError as error:
                if (error.sqlstate or "")[:2] in _OUTAGE_CLASSES:
                    raise
                raise MigrationError(
                    f"schema migration {version} ({name}) failed: {type(error).__name__}: {error}"
                ) from error
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied.append(version)
    return applied


async def connect(dsn: str, timeout: float, *, migrating: bool = True) -> Any:
    """Opens a flusher connection, brings the schema up to date unless told it is already
    (``migrating=False``), prepares staging."""
    connection = await asyncpg.connect(dsn, timeout=timeout, command_timeout=COMMAND_TIMEOUT)
    try:
        if migrating:
            applied = await migrate(connection)
            if applied:
                log.info("applied schema migrations %s", ", ".join(map(str, applied)))
        await connection.execute(_STAGING)
    except BaseException:
        await connection.close(timeout=timeout)
        raise
    return connection


# The ledger's rows are pruned this many at a time, each chunk a short transaction of its own.
PRUNING_CHUNK = 10_000


async def prune_ledger(
    connection: Any, seconds: float, budget: float, before: float
) -> tuple[int, bool]:
    """Deletes the ledger's rows older than ``seconds`` and than ``before`` (unix seconds), a
    chunk at a time, for about ``budget`` seconds at most; returns how many, and whether none
    is left to delete (or another server is pruning: one at a time is enough)."""
    deleted = 0
    deadline = time.monotonic() + budget
    cutoff = None  # the horizon, moved on in the first chunk's transaction
    while True:
        async with connection.transaction():
            if not await connection.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PRUNING_LOCK):
                return deleted, True
            cutoff = cutoff or await connection.fetchval(
                "UPDATE ledger_horizon SET pruned_before = greatest(pruned_before,"
                " least(now() - make_interval(secs => $1), to_timestamp($2)))"
                " RETURNING pruned_before",
                float(seconds),
                float(before),
            )
            status = await connection.execute(
                "DELETE FROM flush_batches WHERE ctid = ANY (ARRAY("
                " SELECT ctid FROM flush_batches WHERE applied_at < $1 LIMIT $2))",
                cutoff,
                PRUNING_CHUNK,
            )
        chunk = int(status.rpartition(" ")[2])
        deleted += chunk
        if chunk < PRUNING_CHUNK:
            return deleted, True
        if time.monotonic() >= deadline:
            return deleted, False


class PastLedgerHorizon(Exception):
    """A spooled batch written before the rows the ledger has pruned: it may have been
    applied, its row pruned since."""


# Whether either of two keys has a row.
_EITHER_EXISTS = """
SELECT EXISTS (
    SELECT FROM pixel_counts
    WHERE (bucket, campaign, creative, affiliate, sub_id)
          IN (($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10))
)
"""
# Where PostgreSQL's timestamptz counts its microseconds from.
_POSTGRES_EPOCH = datetime.datetime.fromtimestamp(POSTGRES_EPOCH, datetime.UTC)


async def apply(connection: Any, batch: Batch, written: float | None = None) -> bool:
    """Applies a batch in one transaction; returns False if the ledger says it already was.

    ``written``, for a batch read from the spool, is when it may have been applied at the
    earliest (unix seconds): :class:`PastLedgerHorizon` if the ledger has been pruned past
    that. The horizon is read in the batch's transaction, and locked against a prune until
    it commits.

    The rows of a batch whose keys are new to the table are copied straight into it: about
    twice as fast as the merge, which PostgreSQL makes a speculative insert per row. Neither
    the batch's first nor its last key may have a row; and if any other key has one (or gets
    one from another writer meanwhile), the copy fails on it, is rolled back to its
    savepoint, and the batch is merged after all. A batch of existing keys, the usual case
    for every flush of a bucket but its first, is merged at once."""
    async with connection.transaction():
        if written is not None:
            horizon = await connection.fetchval(
                "SELECT extract(epoch FROM pruned_before)::float8 FROM ledger_horizon FOR SHARE"
            )
            if horizon is not None and written < horizon:
                raise PastLedgerHorizon(f"the ledger is pruned up to {horizon:.0f}")
        recorded = await connection.fetchval(
            "INSERT INTO flush_batches (batch_id, row_count) VALUES ($1, $2)"
            " ON CONFLICT (batch_id) DO NOTHING RETURNING true",
            batch.batch_id,
            batch.rows,
        )
        if not recorded:
            return False
        if await first_and_last_are_new(connection, batch):
            try:
                async with connection.transaction():  # a savepoint
                    await connection.copy_to_table(
                        "pixel_counts",
                        source=copy_file(batch),
                        columns=TABLE_COLUMNS,
                        format="binary",
                    )
                return True
            except asyncpg.UniqueViolationError:
                pass  # a key has a row: merge
        await connection.copy_to_table("pixel_staging", source=copy_file(batch), format="binary")
        await connection.execute(_MERGE)
    return True


async def first_and_last_are_new(connection: Any, batch: Batch) -> bool:
    """Whether the batch's first and last keys have no row: then its keys look new."""
    keys = []
    for micros, *dimensions in (batch.first_key(), batch.last_key()):
        try:
            bucket = _POSTGRES_EPOCH + datetime.timedelta(microseconds=micros)
        except OverflowError:
            return False  # past Python's datetime (year 9999): merged, with no probe
        keys += [bucket, *dimensions]
    return not await connection.fetchval(_EITHER_EXISTS, *keys)


# A batch goes to the server in pieces of this size. asyncpg copies each into a message buffer
# on the event loop: pieces of 1 MiB stalled it up to 4-16 ms while two connections merged
# 200,000 keys, pieces of 64 KiB 2-4 ms (timed on this machine).
COPY_PIECE = 1 << 16


async def copy_file(batch: Batch) -> AsyncIterator[bytes | memoryview]:
    """The batch as a binary COPY file."""
    yield COPY_HEADER
    tuples = memoryview(batch.tuples)
    for start in range(0, len(tuples), COPY_PIECE):
        yield tuples[start : start + COPY_PIECE]
    yield COPY_TRAILER
