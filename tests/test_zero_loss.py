"""Nothing lost, nothing counted twice: outages, crashes, ambiguous commits, replays and
poison batches, with real processes and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from _fastcount import COLUMNS, IMPRESSIONS, Counters, Window
from loadtests import outage
from server import batch as batch_module
from server import flusher as flusher_module
from server import storage
from server.batch import COPY_HEADER, COPY_TRAILER, POSTGRES_EPOCH, Batch, seal, seal_window
from server.embedded import EmbeddedPostgres
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool, Usage
from server.write_ahead import Pending, WriteAhead
from tests.harness import (
    FIRST_BUCKET,
    LAST_BUCKET,
    DatabaseProxy,
    PixelServer,
    batch_of,
    batch_rows,
    fetch,
    scrape,
    totals_by_key,
    wait_for,
)

UA = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) zero-loss-test"}


async def send(server: PixelServer, query: str, times: int) -> None:
    async with aiohttp.ClientSession(headers=UA) as session:
        for _ in range(times):
            async with session.get(f"{server.base_url}/i.gif?{query}") as answer:
                assert answer.status == 200
                assert len(await answer.read()) == 43


def spooled_impressions(spool: Path) -> collections.Counter[str]:
    """Impressions per campaign in the spool's batch files."""
    totals: collections.Counter[str] = collections.Counter()
    for path in spool.glob("*.batch"):
        for row in batch_rows(Batch.from_bytes(path.read_bytes())):
            totals[row[1]] += row[5]
    return totals


async def refuse_poison(dsn: str) -> None:
    """Makes PostgreSQL reject, for good, any batch with the campaign 'poison'."""
    await fetch(
        dsn, "ALTER TABLE pixel_counts ADD CONSTRAINT no_poison CHECK (campaign <> 'poison')"
    )


async def impressions(dsn: str) -> dict[str, int]:
    return {key[0]: counts[0] for key, counts in (await totals_by_key(dsn)).items()}


async def test_outage_under_load_every_answered_hit_is_stored_once(tmp_path: Path) -> None:
    report = await outage.run(tmp_path, outage=10.0, rate=400.0, before=2.0, after=2.0)
    assert report.failed_requests == 0, report.lines()
    assert report.impressions.sent > 4_000, report.lines()
    assert report.impressions.exact, report.lines()


async def test_crash_during_outage_applies_every_spooled_batch_once(
    pixel_server: Callable[..., PixelServer], own_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    flags = (f"--dsn={own_postgres.dsn}", "--flush-interval=0.2", f"--spool-dir={spool}")
    server = pixel_server(*flags)
    await send(server, "cid=before", 40)
    await wait_for(lambda: "connected to" in server.log())
    deadline = time.monotonic() + 30
    while (await impressions(own_postgres.dsn)).get("before") != 40:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)

    await asyncio.to_thread(own_postgres.stop)
    await send(server, "cid=during", 60)
    await wait_for(lambda: spooled_impressions(spool)["during"] == 60)
    server.kill()  # SIGKILL: only what the spool holds survives
    spooled_ids = {Batch.from_bytes(path.read_bytes()).batch_id for path in spool.glob("*.batch")}

    restarted = pixel_server(*flags)  # the database is still down
    await wait_for(lambda: "spooled batches found" in restarted.log())
    await asyncio.to_thread(own_postgres.start)
    await wait_for(lambda: not list(spool.glob("*.batch")))
    assert await asyncio.to_thread(restarted.terminate) == 0, restarted.log()

    assert await impressions(own_postgres.dsn) == {"before": 40, "during": 60}
    ledger = await fetch(own_postgres.dsn, "SELECT batch_id FROM flush_batches")
    assert spooled_ids <= {row[0] for row in ledger}


async def test_commit_cut_before_its_answer_is_not_counted_twice(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    proxy = DatabaseProxy(database)
    await proxy.open()
    try:
        server = pixel_server(f"--dsn={proxy.dsn()}", "--flush-interval=0.2")
        await wait_for(lambda: "connected to" in server.log())
        proxy.cut_after_next_commit = True
        await send(server, "cid=ambiguous", 30)
        await wait_for(lambda: proxy.commits_cut == 1)
        await wait_for(lambda: "was already applied; skipped" in server.log())
        await send(server, "cid=later", 5)
        assert await asyncio.to_thread(server.terminate) == 0, server.log()
    finally:
        await proxy.close()
    assert await impressions(database) == {"ambiguous": 30, "later": 5}


async def test_replaying_a_sealed_batch_leaves_the_totals_unchanged(database: str) -> None:
    connection = await storage.connect(database, timeout=10)
    try:
        batch = batch_of(
            (1_700_000_000, "replay", "cr", "a", "s", 5, 1, 2, 1, 1, 1),
            (1_700_000_060, "replay", "cr", "a", "s", 1, 0, 0, 0, 0, 0),
        )
        assert await storage.apply(connection, batch) is True
        first = await totals_by_key(database)
        assert await storage.apply(connection, batch) is False
        read_back = Batch.from_bytes(b"".join(batch.spool_pieces()))
        assert await storage.apply(connection, read_back) is False
        assert (
            await totals_by_key(database)
            == first
            == {("replay", "cr", "a", "s"): (6, 1, 2, 1, 1, 1)}
        )
    finally:
        await connection.close()


async def test_the_first_and_last_buckets_the_engine_takes_are_stored(database: str) -> None:
    """The engine refuses buckets past what timestamptz holds (tests/test_counters.py); the
    ones at either end go into PostgreSQL as they are."""
    batch = batch_of(
        (FIRST_BUCKET, "first", "", "", "", 1, 0, 0, 0, 0, 0),
        (LAST_BUCKET, "last", "", "", "", 2, 0, 0, 0, 0, 0),
    )
    connection = await storage.connect(database, timeout=10)
    try:
        assert await storage.apply(connection, batch) is True
        stored = await connection.fetch(
            "SELECT campaign, to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS BC'),"
            " impressions FROM pixel_counts ORDER BY bucket"
        )
    finally:
        await connection.close()
    assert [tuple(row) for row in stored] == [
        ("first", "4714-11-24 00:00:00 BC", 1),
        ("last", "294276-12-31 23:59:59 AD", 2),
    ]


async def test_sigterm_with_the_database_down_spools_and_the_next_start_applies(
    pixel_server: Callable[..., PixelServer], database: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    proxy = DatabaseProxy(database)  # closed: the database is unreachable
    flags = (f"--dsn={proxy.dsn()}", "--flush-interval=0.2", f"--spool-dir={spool}")
    server = pixel_server(*flags, "--shutdown-timeout=4")
    await send(server, "cid=kept", 25)
    started = time.monotonic()
    assert await asyncio.to_thread(server.terminate) == 0, server.log()
    assert time.monotonic() - started < 4 + 1, "exits within --shutdown-timeout"
    assert spooled_impressions(spool) == {"kept": 25}
    assert "wait in the spool" in server.log()

    await proxy.open()
    try:
        again = pixel_server(*flags)
        await wait_for(lambda: not list(spool.glob("*.batch")))
        assert await asyncio.to_thread(again.terminate) == 0, again.log()
    finally:
        await proxy.close()
    assert await impressions(database) == {"kept": 25}


async def test_a_database_that_refuses_writes_is_an_outage_not_a_bad_batch(
    database: str, tmp_path: Path
) -> None:
    """A database turned read-only (a failover, a storage quota) says nothing about the
    batches: they wait, the flusher reports not ready, and they land once it takes writes
    again. None is dead-lettered."""
    counters, metrics = Counters(), Metrics()
    flusher = Flusher(counters, database, metrics, 1.0, Spool(tmp_path, 1 << 20), 10, 2)
    counters.add(60, "before", "", "", "", IMPRESSIONS, 5)
    await flusher.flush()
    for connection in flusher._connections:  # read-only from their next transaction on
        await connection.execute("SET default_transaction_read_only = on")
    counters.add(60, "during", "", "", "", IMPRESSIONS, 7)
    await flusher.flush()
    assert not flusher.ready and "read-only" in flusher.problem
    assert (metrics.flush_failures, metrics.dead_lettered) == (1, 0)
    await flusher.close(5.0)  # on new connections, which take writes
    assert await impressions(database) == {"before": 5, "during": 7}
    assert metrics.dead_lettered == 0 and not list((tmp_path / "dead-letter").iterdir())


async def test_poison_batch_is_dead_lettered_and_later_batches_land(
    pixel_server: Callable[..., PixelServer], database: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.2", f"--spool-dir={spool}")
    await wait_for(lambda: "connected to" in server.log())
    await refuse_poison(database)
    await send(server, "cid=poison", 3)
    await wait_for(lambda: list((spool / "dead-letter").glob("*.batch")))
    await send(server, "cid=healthy", 4)
    assert "pixel_dead_lettered_batches_total 1\n" in await scrape(server)
    assert await asyncio.to_thread(server.terminate) == 0, server.log()

    assert await impressions(database) == {"healthy": 4}
    (letter,) = (spool / "dead-letter").glob("*.batch")
    data = letter.read_bytes()
    assert [row[1:6] for row in batch_rows(Batch.from_bytes(data))] == [("poison", "", "", "", 3)]
    # The first line says why; the rest is a COPY file psql's \copy loads as it is.
    assert "CheckViolationError" in orjson.loads(data.partition(b"\n")[0])["error"]
    assert "dead-lettered" in server.log()


def test_a_spool_file_from_before_timestamptz_buckets_is_read() -> None:
    """Spool files written while batches held buckets as unix seconds (no "last_tuple" in
    their first line) are read with the buckets converted."""
    batch = batch_of(
        (1_700_000_040, "a", "", "", "", 1, 0, 0, 0, 0, 0),
        (1_700_000_100, "b", "cr", "aff", "sub", 0, 0, 2, 1, 0, 0),
    )
    seconds = bytearray(batch.tuples)
    for start in (0, batch.last_tuple):
        (micros,) = struct.unpack_from(">q", seconds, start + 6)
        struct.pack_into(">q", seconds, start + 6, micros // 1_000_000 + POSTGRES_EPOCH)
    head = orjson.dumps({"batch_id": str(batch.batch_id), "rows": 2})
    old = b"".join((head, b"\n", COPY_HEADER, seconds, COPY_TRAILER))
    assert Batch.from_bytes(old) == batch
    with pytest.raises(ValueError, match="not a spooled batch"):
        Batch.from_bytes(b"".join((head, b"\n", COPY_HEADER, seconds[:-3], COPY_TRAILER)))
    for past in (LAST_BUCKET + 1, 2**62):  # buckets past timestamptz
        struct.pack_into(">q", seconds, 6, past)
        with pytest.raises(ValueError, match=r"not a spooled batch: .* past what PostgreSQL"):
            Batch.from_bytes(b"".join((head, b"\n", COPY_HEADER, seconds, COPY_TRAILER)))


async def test_a_spool_file_from_before_the_binary_format_is_applied_once(
    database: str, tmp_path: Path
) -> None:
    """Spool files written when a batch was one JSON document of rows, with unix-second
    buckets, are applied under their own batch id: once, even when the file comes twice. Those
    that are not such a document go to the dead letters."""
    batch_id = uuid.uuid4()
    rows = [
        [1_700_000_040, "json-a", "", "", "", 1, 0, 0, 0, 0, 0],
        [1_700_000_100, "json-b", "cr", "aff", "sub", 0, 0, 2, 1, 0, 3],
        [1_700_000_100, "json-c", "", "", "", 0, 0, 0, 0, 0, 0],
    ]
    document = orjson.dumps({"batch_id": str(batch_id), "rows": rows})
    spool = tmp_path / "spool"
    spool.mkdir()
    now = time.time_ns()  # spool files are named by when they were written
    for n in (1, 2):
        (spool / f"{now + n:020d}-{batch_id}.batch").write_bytes(document)
    damaged = {
        orjson.dumps({"batch_id": str(uuid.uuid4()), "rows": [[60, "short", "", ""]]}),
        orjson.dumps({"batch_id": 7, "rows": rows}),
    }
    for n, document in enumerate(damaged, start=3):
        (spool / f"{now + n:020d}-{uuid.uuid4()}.batch").write_bytes(document)
    flusher = Flusher(Counters(), database, Metrics(), 1.0, Spool(spool, 1 << 20), 10, 2)
    await flusher.flush()
    await flusher.close(5.0)
    assert await totals_by_key(database) == {
        ("json-a", "", "", ""): (1, 0, 0, 0, 0, 0),
        ("json-b", "cr", "aff", "sub"): (0, 0, 2, 1, 0, 3),
    }
    buckets = await fetch(
        database, "SELECT campaign, extract(epoch FROM bucket)::bigint FROM pixel_counts ORDER BY 1"
    )
    ledger = await fetch(database, "SELECT batch_id, row_count FROM flush_batches")
    assert [tuple(row) for row in buckets] == [("json-a", 1_700_000_040), ("json-b", 1_700_000_100)]
    assert [tuple(row) for row in ledger] == [(batch_id, 2)]
    assert not list(spool.glob("*.batch"))
    assert {path.read_bytes() for path in (spool / "dead-letter").iterdir()} == damaged


def test_a_spool_file_that_misplaces_its_last_row_is_not_a_batch() -> None:
    batch = batch_of(*((60, f"c{n}", "", "", "", 1, 0, 0, 0, 0, 0) for n in range(3)))
    assert Batch.from_bytes(b"".join(batch.spool_pieces())) == batch
    for wrong in (0, batch.last_tuple - 1, len(batch.tuples)):
        damaged = b"".join(dataclasses.replace(batch, last_tuple=wrong).spool_pieces())
        with pytest.raises(ValueError, match="not a spooled batch"):
            Batch.from_bytes(damaged)


def test_spool_files_are_whole_or_absent(tmp_path: Path) -> None:
    (tmp_path / "leftover.batch.partial").write_bytes(b'{"batch_id": "cut sh')
    spool = Spool(tmp_path, max_bytes=1000)
    assert spool.adopt() == []
    assert not (tmp_path / "leftover.batch.partial").exists()
    assert spool.batches == 0 and not spool.over_budget
    batch = batch_of(*((60, f"c{n}", "", "", "", 1, 0, 0, 0, 0, 0) for n in range(5)))
    path = spool.write(batch)
    assert spool.read(path) == batch
    assert spool.batches == 1 and spool.bytes == path.stat().st_size < 1000
    spool.write(batch)
    assert spool.over_budget
    assert Spool(tmp_path, max_bytes=1000).bytes == spool.bytes  # a restart finds them
    spool.remove(path)
    assert spool.batches == 1 and not path.exists()


def test_a_write_the_disk_refuses_leaves_no_part_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every batch is spooled as it is sealed: a full disk must not keep the parts of the
    files it refused, uncounted, until the next start."""
    spool = Spool(tmp_path, 1 << 20)

    def full_disk(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    for _ in range(3):
        with pytest.raises(OSError, match="No space left"):
            spool.write(batch_of((60, "c", "", "", "", 1, 0, 0, 0, 0, 0)))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dead-letter", "owners"]
    assert spool.batches == 0


# A process that opens the spool, writes one batch and a file in the making, says its owner
# token, and then closes the spool or waits to be killed.
_SPOOL_OWNER = """
import sys, time
from pathlib import Path
from server.batch import Batch
from server.spool import Spool
from tests.harness import batch_of
spool = Spool(Path(sys.argv[1]), 1 << 20)
path = spool.write(batch_of((60, sys.argv[2], "", "", "", 1, 0, 0, 0, 0, 0)))
path.with_name(path.name.replace("-", "-0", 1) + ".partial").write_bytes(b"cut sh")
print(spool.owner, flush=True)
if sys.argv[3] == "close":
    spool.close()
else:
    time.sleep(60)
"""


def spool_owner(folder: Path, campaign: str, ending: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _SPOOL_OWNER, str(folder), campaign, ending],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    with process.stdout:
        return process, process.stdout.readline().strip()


def test_a_starting_worker_adopts_the_files_of_owners_gone_and_no_others(
    tmp_path: Path,
) -> None:
    """Workers share the spool folder: a starting one takes the batches of processes gone,
    killed or closed, and of older versions, but not a live sibling's, whose batches are
    under way, nor its files in the making."""
    closed, closed_owner = spool_owner(tmp_path, "closed", "close")
    assert closed.wait(30) == 0
    killed, killed_owner = spool_owner(tmp_path, "killed", "wait")
    killed.kill()
    killed.wait()
    old_version = tmp_path / f"{time.time_ns():020d}-{uuid.uuid4()}.batch"
    old_version.write_bytes(
        b"".join(batch_of((60, "old", "", "", "", 1, 0, 0, 0, 0, 0)).spool_pieces())
    )
    (tmp_path / "00000000000000000003-c.batch.1234.partial").write_bytes(b"cut sh")
    sibling, sibling_owner = spool_owner(tmp_path, "sibling", "wait")
    try:
        siblings = sorted(tmp_path.glob(f"*{sibling_owner}*"))
        assert len(siblings) == 2  # a batch and one in the making

        ours = Spool(tmp_path, 1 << 20)
        adopted = ours.adopt()
        campaigns = [ours.read(path).first_key()[1] for path in adopted]
        assert campaigns == ["closed", "killed", "old"]  # oldest first
        assert all(path.name.endswith(f".{ours.owner}.batch") for path in adopted)
        assert sorted(tmp_path.glob("*.partial")) == [p for p in siblings if p.suffix == ".partial"]
        assert sorted(path.name for path in tmp_path.glob("*.batch")) == sorted(
            [*(path.name for path in adopted), *(p.name for p in siblings if p.suffix == ".batch")]
        )
        locks = {path.name for path in (tmp_path / "owners").iterdir()}
        assert locks == {f"{ours.owner}.lock", f"{sibling_owner}.lock"}
        assert closed_owner != killed_owner
        assert ours.batches == 4  # the sibling's batch too: the figures are the folder's
    finally:
        sibling.kill()
        sibling.wait()
    # Once the sibling is gone, the next to start takes its batch, and none of ours.
    theirs = Spool(tmp_path, 1 << 20)
    assert [theirs.read(path).first_key()[1] for path in theirs.adopt()] == ["sibling"]
    assert not list(tmp_path.glob("*.partial"))


def test_a_lock_file_taken_for_a_dead_owners_before_it_was_locked_is_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process adopting at the moment another makes its lock file, before locking it,
    finds it free and removes it: the new owner makes another, so that its files are never
    taken for a dead owner's."""
    adopter = Spool(tmp_path, 1 << 20)
    flock = fcntl.flock
    raced: list[list[Path]] = []  # what the adopter adopted, in the race

    def racing_flock(descriptor: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX and not raced:  # a new spool's own lock, not held yet
            raced.append(adopter.adopt())
        flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", racing_flock)
    spool = Spool(tmp_path, 1 << 20)
    assert raced == [[]]
    assert (tmp_path / "owners" / f"{spool.owner}.lock").exists()
    path = spool.write(batch_of((60, "mine", "", "", "", 1, 0, 0, 0, 0, 0)))
    assert adopter.adopt() == [] and path.exists()


def test_a_lock_that_cannot_be_opened_is_a_live_owners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's owner, whose lock file this process may not open: its files are left
    alone, and the start goes on."""
    theirs = Spool(tmp_path, 1 << 20)
    path = theirs.write(batch_of((60, "theirs", "", "", "", 1, 0, 0, 0, 0, 0)))
    theirs.close()  # gone, as far as the lock goes; but its lock file cannot be read
    (tmp_path / "owners" / f"{theirs.owner}.lock").touch()
    open_file = os.open

    def refused(file: Any, flags: int, *args: Any) -> int:
        if Path(file).name == f"{theirs.owner}.lock":
            raise PermissionError(errno.EACCES, "Permission denied")
        return open_file(file, flags, *args)

    monkeypatch.setattr(os, "open", refused)
    assert Spool(tmp_path, 1 << 20).adopt() == [] and path.exists()


async def test_spool_figures_follow_other_processes_after_refresh(tmp_path: Path) -> None:
    ours, theirs = Spool(tmp_path, 1 << 20), Spool(tmp_path, 1 << 20)
    batch = batch_of((60, "c", "", "", "", 1, 0, 0, 0, 0, 0))
    path = theirs.write(batch)
    assert (ours.batches, theirs.batches) == (0, 1)
    await ours.refresh()
    assert (ours.batches, ours.bytes) == (1, path.stat().st_size)
    theirs.remove(path)
    await ours.refresh()
    assert (ours.batches, ours.bytes) == (0, 0)


async def test_an_unreadable_spool_file_is_moved_aside_and_blames_no_database(
    database: str, tmp_path: Path
) -> None:
    """A spool entry that cannot be read (a folder in its place, a symbolic link to itself or
    to nothing) goes to the dead letters; the batches behind it land, even over one
    connection, and the flusher stays ready."""
    spool = Spool(tmp_path, 1 << 20)
    (tmp_path / f"00000000000000000001-folder.{spool.owner}.batch").mkdir()
    loop = tmp_path / f"00000000000000000002-loop.{spool.owner}.batch"
    loop.symlink_to(loop.name)
    (tmp_path / f"00000000000000000003-nowhere.{spool.owner}.batch").symlink_to("nowhere")
    spool.write(batch_of((60, "behind", "", "", "", 4, 0, 0, 0, 0, 0)))
    metrics = Metrics()
    flusher = Flusher(Counters(), database, metrics, 1.0, spool, 10, 1)
    await flusher.flush()
    assert flusher.ready and metrics.flush_failures == 0
    assert await impressions(database) == {"behind": 4}
    assert metrics.dead_lettered == 3
    assert sorted(path.name for path in spool.dead_letter_directory.iterdir()) == [
        f"00000000000000000001-folder.{spool.owner}.batch",
        f"00000000000000000002-loop.{spool.owner}.batch",
        f"00000000000000000003-nowhere.{spool.owner}.batch",
    ]
    assert spool.usage == spool.scan() == (0, 0)
    await flusher.close(5.0)


def spool_at(folder: Path, batch: Batch, seconds_ago: float) -> None:
    """Spools ``batch`` as if ``seconds_ago``: spool files are named by when they were written."""
    written = Spool(folder, 1 << 30).write(batch)
    then = time.time_ns() - int(seconds_ago * 1e9)
    written.rename(written.with_name(f"{then:020d}-{batch.batch_id}.batch"))


async def test_the_ledger_forgets_old_batches_and_a_spool_file_older_than_that_waits_aside(
    database: str, tmp_path: Path
) -> None:
    """The ledger keeps an applied batch's id for ``ledger_seconds`` (a day here). A spooled
    batch the ledger has not been pruned past is applied, however old (an outage of any
    length, nothing pruned meanwhile); one written before the pruned rows is dead-lettered,
    for it may have been applied before the ledger forgot it."""
    day = 86400
    connection = await storage.connect(database, 10.0)  # the schema
    try:
        await connection.execute(
            "INSERT INTO flush_batches (batch_id, row_count, applied_at) VALUES"
            " ($1, 1, now() - interval '25 hours'), ($2, 1, now() - interval '23 hours')",
            uuid.uuid4(),
            kept := uuid.uuid4(),
        )
    finally:
        await connection.close()
    outage = batch_of((60, "outage", "", "", "", 3, 0, 0, 0, 0, 0))
    spool_at(tmp_path, outage, 40 * day)  # never pruned past yet: applied, then pruning
    metrics = Metrics()
    spool = Spool(tmp_path, 1 << 30)
    flusher = Flusher(Counters(), database, metrics, 1.0, spool, 10, 2, ledger_seconds=day)
    await flusher.flush()
    assert await impressions(database) == {"outage": 3}
    ledger = await fetch(database, "SELECT batch_id FROM flush_batches")
    assert {row[0] for row in ledger} == {kept, outage.batch_id}  # the 25 hours old one went

    old = batch_of((60, "old", "", "", "", 4, 0, 0, 0, 0, 0))
    spool_at(tmp_path, old, 2 * day)  # before the pruned rows: aside
    recent = batch_of((60, "recent", "", "", "", 5, 0, 0, 0, 0, 0))
    spool_at(tmp_path, recent, 0.8 * day)
    restarted = Flusher(Counters(), database, metrics, 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    await restarted.flush()
    await restarted.close(5.0)
    await flusher.close(5.0)
    assert await impressions(database) == {"outage": 3, "recent": 5}
    (letter,) = spool.dead_letter_directory.iterdir()
    head = orjson.loads(letter.read_bytes().partition(b"\n")[0])
    assert head["batch_id"] == str(old.batch_id) and "spooled 2 days ago" in head["error"]
    assert metrics.dead_lettered == 1 and not list(tmp_path.glob("*.batch"))


async def test_a_refresh_that_a_write_ran_across_keeps_the_written_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, 1 << 20)
    scan = spool.scan

    def scan_then_write() -> Usage:
        before = scan()
        spool.write(batch_of((60, "c", "", "", "", 1, 0, 0, 0, 0, 0)))  # after the scan looked
        return before

    monkeypatch.setattr(spool, "scan", scan_then_write)
    await spool.refresh()
    assert spool.usage == scan() and spool.batches == 1


async def test_a_spool_that_cannot_be_listed_keeps_its_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, 1 << 20)
    spool.write(batch_of((60, "c", "", "", "", 1, 0, 0, 0, 0, 0)))
    counted = spool.usage

    def failing_disk() -> Usage:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool, "scan", failing_disk)
    await spool.refresh()
    assert spool.usage == counted and spool.batches == 1
    assert "cannot list spool" in caplog.text


async def test_a_failing_spool_disk_is_logged_once_and_the_counts_still_land(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every batch is spooled as it is sealed: a disk that refuses the writes is an error for
    the operator, logged once (not at every flush), while the database takes the batches
    from memory; the log says when the spool takes them again."""
    caplog.set_level(logging.INFO, "server.write_ahead")
    spool = Spool(tmp_path, 1 << 30)
    write = spool.write
    failing = True

    def full_disk(batch: Batch) -> Path:
        if failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(batch)

    monkeypatch.setattr(spool, "write", full_disk)
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, spool, 10, 2)
    for _ in range(3):
        counters.add(60, "full", "", "", "", IMPRESSIONS, 1)
        await flusher.flush()
    failing = False
    counters.add(60, "full", "", "", "", IMPRESSIONS, 1)
    await flusher.flush()
    await flusher.close(5.0)
    assert await impressions(database) == {"full": 4}
    assert caplog.text.count("cannot be written (No space left on device)") == 1
    assert caplog.text.count("takes batches again") == 1
    assert not list(tmp_path.glob("*.batch"))


async def test_memory_cap_drops_are_counted_and_logged(
    pixel_server: Callable[..., PixelServer], database: str, tmp_path: Path
) -> None:
    proxy = DatabaseProxy(database)  # closed: the database is unreachable
    server = pixel_server(
        f"--dsn={proxy.dsn()}",
        "--flush-interval=0.1",
        f"--spool-dir={tmp_path / 'spool'}",
        "--spool-max-bytes=1",  # no room: batches stay in memory
        "--max-pending-batches=2",
    )
    await wait_for(lambda: "cannot write" in server.log())
    async with aiohttp.ClientSession() as session:

        async def gauges() -> dict[str, float]:
            async with session.get(f"{server.admin_url}/metrics") as answer:
                text = await answer.text()
            return {
                name: float(value)
                for name, _, value in (line.partition(" ") for line in text.splitlines())
                if not name.startswith("#")
            }

        for window in range(5):
            await send(server, f"cid=w{window}", 1)
            # Each window sealed apart: wait until it is pending or dropped.
            deadline = time.monotonic() + 30
            while True:
                now = await gauges()
                if now["pixel_pending_batches"] + now["pixel_dropped_rows_total"] == window + 1:
                    break
                assert time.monotonic() < deadline, now
                await asyncio.sleep(0.05)
        async with session.get(f"{server.base_url}/readyz") as answer:
            assert answer.status == 503
        dropped = (await gauges())["pixel_dropped_rows_total"]
    # w0 went to the spool before it was over budget; w3 and w4 are held; w1 and w2 dropped.
    assert dropped == 2
    assert spooled_impressions(tmp_path / "spool") == {"w0": 1}
    assert server.log().count("memory cap reached") == 2
    assert server.log().count("over its budget") == 1
    assert await asyncio.to_thread(server.terminate) == 0


@pytest.mark.parametrize("after", [0.0, 0.001, 0.01])
async def test_a_seal_cancelled_midway_still_hands_over_every_row(after: float) -> None:
    counters = Counters()
    for n in range(300_000):
        counters.add(60, f"c{n % 13}", f"cr{n}", "", "", IMPRESSIONS, 2)
    window = counters.swap()
    batches: list[Batch] = []
    events = [0] * len(COLUMNS)
    sealing = asyncio.create_task(seal(window, batches.append, events))
    await asyncio.sleep(after)
    sealing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sealing
    assert sealing.cancelled()
    assert len(window) == 0
    assert sum(batch.rows for batch in batches) == 300_000
    assert events == [600_000, 0, 0, 0, 0, 0]
    rows = [row for batch in batches for row in batch_rows(batch)]
    assert rows == sorted(rows) and len({row[:5] for row in rows}) == 300_000


async def test_a_seal_that_fails_midway_hands_over_what_it_sealed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch_module, "BATCH_ROWS", 10)
    counters = Counters()
    for n in range(25):
        counters.add(60, f"c{n}", "", "", "", IMPRESSIONS)
    window = counters.swap()

    class FailingSecondTime:
        """The window, whose second drain runs out of memory."""

        totals = property(lambda self: window.totals)
        drains = 0

        def __len__(self) -> int:
            return len(window)

        def drain_copy(self, limit: int) -> bytes:
            self.drains += 1
            if self.drains == 2:
                raise MemoryError
            return window.drain_copy(limit)

    batches: list[Batch] = []
    with pytest.raises(MemoryError):
        await seal(FailingSecondTime(), batches.append, [0] * len(COLUMNS))  # type: ignore[arg-type]
    (batch,) = batches
    rows = batch_rows(batch)
    assert [row[1] for row in rows] == sorted(f"c{n}" for n in range(25))[:10]
    assert batch.last_key()[1:] == rows[-1][1:5]
    assert len(window) == 15  # the rest is still in the window, not half lost


async def test_a_window_whose_seal_failed_is_flushed_next_time(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealings = 0

    def out_of_memory_once(window: Window, add: Callable[[Batch], object]) -> tuple[int, ...]:
        nonlocal sealings
        sealings += 1
        if sealings == 1:
            raise MemoryError
        return seal_window(window, add)

    monkeypatch.setattr(batch_module, "seal_window", out_of_memory_once)
    counters = Counters()
    metrics = Metrics()
    flusher = Flusher(counters, database, metrics, 1.0, Spool(tmp_path, 1 << 20), 10, 2)
    counters.add(60, "first", "", "", "", IMPRESSIONS, 3)
    await flusher.flush()  # the seal fails: the window waits, the flusher goes on
    counters.add(60, "second", "", "", "", IMPRESSIONS, 4)
    await flusher.flush()
    await flusher.close(5.0)
    assert sealings == 3  # the failed seal, then one for each window
    assert await impressions(database) == {"first": 3, "second": 4}
    assert metrics.events[IMPRESSIONS] == 7


async def test_the_first_batches_are_merged_while_the_rest_are_still_sealed(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_module, "BATCH_ROWS", 10)
    merging = threading.Event()
    apply = storage.apply

    async def noted_apply(connection: object, batch: Batch, written: float | None) -> bool:
        merging.set()
        return await apply(connection, batch, written)

    monkeypatch.setattr(storage, "apply", noted_apply)
    merged_meanwhile: list[bool] = []
    seal_window = batch_module.seal_window

    def sealing_that_waits(window: Window, add: Callable[[Batch], object]) -> tuple[int, ...]:
        def add_then_wait(batch: Batch) -> None:
            add(batch)
            if not merged_meanwhile:  # after the first batch, until a merge starts
                merged_meanwhile.append(merging.wait(10.0))

        return seal_window(window, add_then_wait)

    monkeypatch.setattr(batch_module, "seal_window", sealing_that_waits)
    counters = Counters()
    for n in range(25):
        counters.add(60, f"c{n}", "", "", "", IMPRESSIONS, n + 1)
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 20), 10, 2)
    await flusher.flush()
    assert merged_meanwhile == [True]
    assert flusher.pending_batches == 0
    await flusher.close(5.0)
    assert await impressions(database) == {f"c{n}": n + 1 for n in range(25)}


@pytest.mark.parametrize("after", [0.0, 0.005, 0.02, 0.05, 0.1])
async def test_a_flush_cancelled_at_shutdown_loses_nothing_and_counts_nothing_twice(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: float
) -> None:
    """The flush in progress (sealing and merging at once) is cancelled, as the shutdown does
    as a last resort, close() flushes the rest, and the next start applies what was spooled.
    Where the cancel lands is a matter of timing, so several delays are tried; the test after
    next puts one inside a BEGIN on purpose."""
    monkeypatch.setattr(batch_module, "BATCH_ROWS", 2_000)
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    await flusher.flush()  # connected
    expected = expect_keys(counters, 50_000)
    flushing = asyncio.create_task(flusher.flush())
    await asyncio.sleep(after)
    flushing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flushing
    counters.add(120, "after", "", "", "", IMPRESSIONS, 5)
    expected[("after", "", "", "")] = (5, 0, 0, 0, 0, 0)
    await flusher.close(5.0)
    restarted = Flusher(Counters(), database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    await restarted.flush()
    await restarted.close(5.0)
    assert await totals_by_key(database) == expected
    assert not list(tmp_path.glob("*.batch"))


def expect_keys(counters: Counters, keys: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Counts ``keys`` keys, each a few times; returns the totals they must end up with."""
    expected: dict[tuple[str, ...], tuple[int, ...]] = {}
    for n in range(keys):
        counters.add(60, f"c{n % 7}", f"cr{n}", "", "", IMPRESSIONS, 1 + n % 3)
        expected[(f"c{n % 7}", f"cr{n}", "", "")] = (1 + n % 3, 0, 0, 0, 0, 0)
    return expected


async def test_a_flush_cancelled_inside_a_begin_loses_nothing(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands just after a batch's BEGIN ran, before asyncpg took it in: asyncpg
    then takes every later transaction on that connection for a savepoint of that one, which
    is never committed, unless the connection is dropped."""
    monkeypatch.setattr(batch_module, "BATCH_ROWS", 2_000)
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    await flusher.flush()  # connected
    expected = expect_keys(counters, 10_000)
    begun = asyncio.Event()
    execute = asyncpg.Connection.execute

    async def execute_then_wait(self: asyncpg.Connection, query: str, *args: Any) -> Any:
        result = await execute(self, query, *args)
        if query.startswith("BEGIN") and not begun.is_set():
            begun.set()
            await asyncio.sleep(60)  # where the cancel lands
        return result

    monkeypatch.setattr(asyncpg.Connection, "execute", execute_then_wait)
    flushing = asyncio.create_task(flusher.flush())
    await asyncio.wait_for(begun.wait(), 10)
    flushing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flushing
    await flusher.close(5.0)
    restarted = Flusher(Counters(), database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    await restarted.flush()
    await restarted.close(5.0)
    assert await totals_by_key(database) == expected


async def test_shutdown_with_the_database_hung_spools_in_time_and_the_next_start_applies(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database stops answering, its connections open, while a flush is under way: the
    shutdown drops them rather than wait for answers (each statement would wait up to
    storage.COMMAND_TIMEOUT, 60 s) or cancel the flush, spools what was not applied, and the
    next start applies it once."""
    monkeypatch.setattr(batch_module, "BATCH_ROWS", 2_000)
    proxy = DatabaseProxy(database)
    await proxy.open()
    counters = Counters()
    flusher = Flusher(counters, proxy.dsn(), Metrics(), 60.0, Spool(tmp_path, 1 << 30), 10, 2)
    await flusher.flush()  # connected
    expected = expect_keys(counters, 20_000)
    proxy.hang()
    running = asyncio.create_task(flusher.run())  # its first flush starts at once, and waits
    try:
        await asyncio.sleep(0.2)
        await flusher.finish(running, 0.5)
        # Its connections dropped, the flush failed at once and spooled its batches itself,
        # not waiting to be cancelled.
        assert running.done() and not running.cancelled()
        await flusher.close(2.0)
    finally:
        await proxy.close()
    assert flusher.pending_batches > 0  # in the spool
    restarted = Flusher(Counters(), database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    await restarted.flush()
    await restarted.close(5.0)
    assert await totals_by_key(database) == expected
    assert not list(tmp_path.glob("*.batch"))


async def test_a_flusher_that_stopped_on_a_bug_still_makes_the_final_flush(
    database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 60.0, Spool(tmp_path, 1 << 20), 10, 2)

    async def a_bug() -> None:
        raise RuntimeError("a bug")

    flusher._flush_reporting_errors = a_bug  # type: ignore[method-assign]
    running = asyncio.create_task(flusher.run())
    await asyncio.wait({running}, timeout=5)
    assert running.done()
    counters.add(60, "kept", "", "", "", IMPRESSIONS, 3)
    await flusher.finish(running, 1.0)
    await flusher.close(5.0)
    assert "the flusher stopped on an error" in caplog.text
    assert await impressions(database) == {"kept": 3}


async def test_a_hung_database_holds_no_more_than_an_interval_of_counts_in_memory(
    database: str, tmp_path: Path
) -> None:
    """The database stops answering, its connections open, so a flush waits on it (up to
    storage.COMMAND_TIMEOUT, 60 s): every interval meanwhile seals the window and spools what
    is in memory, so a hard kill loses no more than an interval. Another process (the next
    start) applies the spool, and the flush that hung, if it ever commits, counts nothing
    twice."""
    proxy = DatabaseProxy(database)
    await proxy.open()
    counters = Counters()
    spool = Spool(tmp_path, 1 << 30)
    flusher = Flusher(counters, proxy.dsn(), Metrics(), 0.1, spool, 10, 2)
    counters.add(60, "before", "", "", "", IMPRESSIONS, 3)
    await flusher.flush()  # connected, applied
    proxy.hang()
    counters.add(60, "hung", "", "", "", IMPRESSIONS, 4)
    running = asyncio.create_task(flusher.run())  # its first flush waits on the database
    try:
        await wait_for(lambda: spooled_impressions(tmp_path)["hung"] == 4)
        counters.add(60, "later", "", "", "", IMPRESSIONS, 5)  # sealed and spooled on time
        await wait_for(lambda: spooled_impressions(tmp_path)["later"] == 5)
        assert not running.done() and not len(counters)
        # A hard kill now (the kernel lets go of the spool's lock, as close() does): the next
        # start applies the spool on its own.
        spool.close()
        restarted = Flusher(Counters(), database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
        await restarted.flush()
        await restarted.close(5.0)
        assert await impressions(database) == {"before": 3, "hung": 4, "later": 5}
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await proxy.close()
    assert await impressions(database) == {"before": 3, "hung": 4, "later": 5}


def gate_writes(spool: Spool, monkeypatch: pytest.MonkeyPatch, disk: threading.Event) -> list[Path]:
    """Makes the spool's writes wait until ``disk`` is set, as on a disk that hangs; returns
    the files written, as they are written."""
    write, written = spool.write, []

    def gated_write(batch: Batch) -> Path:
        disk.wait(30)
        written.append(write(batch))
        return written[-1]

    monkeypatch.setattr(spool, "write", gated_write)
    return written


async def test_a_batch_being_written_when_its_writer_is_cancelled_is_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush cancelled while it spools (at shutdown, say) lets go of the writer's lock, but
    its write goes on in the thread: the next writer skips that batch, whose file the write
    under way still records, rather than write it a second time."""
    spool = Spool(tmp_path, 1 << 30)
    disk = threading.Event()
    written = gate_writes(spool, monkeypatch, disk)
    write_ahead = WriteAhead(spool)
    item = Pending(batch_of((60, "once", "", "", "", 1, 0, 0, 0, 0, 0)))

    async def spool_it() -> None:
        async with write_ahead.lock:
            await write_ahead.write([item])

    cancelled = asyncio.create_task(spool_it())
    await wait_for(lambda: item.writing)
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    await asyncio.wait_for(spool_it(), 5)  # skips it: no second write queued behind the first
    disk.set()
    await wait_for(lambda: item.path is not None)
    assert list(tmp_path.glob("*.batch")) == written == [item.path]
    assert not item.writing and spool.read(written[0]) == item.batch


async def test_every_sealed_batch_is_spooled_while_the_database_applies_it(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILL or a power loss in the middle of a flush loses only the window still being
    counted: each batch is written to the spool (fsynced) as it is sealed, while the database
    applies it, and its file is removed once it is applied. Here a healthy flush leaves no
    file behind; then the database hangs, its connections open, long before the next
    interval: the whole window is on disk all the same, and the next start applies it once."""
    monkeypatch.setattr(batch_module, "BATCH_ROWS", 50)
    proxy = DatabaseProxy(database)
    await proxy.open()
    spool = Spool(tmp_path, 1 << 30)
    disk = threading.Event()
    disk.set()
    written = gate_writes(spool, monkeypatch, disk)
    apply = storage.apply

    async def slow_apply(connection: object, batch: Batch, written: float | None) -> bool:
        await asyncio.sleep(0.2)  # each batch's write, a few milliseconds, ends first
        return await apply(connection, batch, written)

    counters = Counters()
    flusher = Flusher(counters, proxy.dsn(), Metrics(), 60.0, spool, 10, 2)
    expected = expect_keys(counters, 500)
    with monkeypatch.context() as patch:
        patch.setattr(storage, "apply", slow_apply)
        await flusher.flush()
    await wait_for(lambda: len(written) == 10 and not list(tmp_path.glob("*.batch")))
    assert await totals_by_key(database) == expected
    proxy.hang()
    again = expect_keys(counters, 500)  # each key counted again
    for key in again:
        expected[key] = tuple(2 * count for count in expected[key])
    running = asyncio.create_task(flusher.run())  # its first flush waits on the database
    try:
        spooled = sum(counts[0] for counts in again.values())
        await wait_for(lambda: sum(spooled_impressions(tmp_path).values()) == spooled)
        assert not running.done()
        # A hard kill now (the kernel lets go of the spool's lock, as close() does): the next
        # start applies the spool on its own.
        spool.close()
        restarted = Flusher(Counters(), database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
        await restarted.flush()
        await restarted.close(5.0)
        assert await totals_by_key(database) == expected
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await proxy.close()
    assert await totals_by_key(database) == expected


@pytest.mark.parametrize("answers", ["before the shutdown", "after it"])
async def test_a_hung_spool_disk_holds_up_no_flush_and_leaves_no_file_behind(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: str
) -> None:
    """A disk that does not answer (a hung network mount, say) holds up only the spool's
    writer: the flushes go on, one batch dead-lettered and one applied while their writes
    wait; a shutdown gives up on the write under way after a connect timeout. The files
    written once the disk answers, of batches settled meanwhile, are removed."""
    monkeypatch.setattr(flusher_module, "CONNECT_TIMEOUT", 0.2)
    spool = Spool(tmp_path, 1 << 30)
    disk = threading.Event()
    written = gate_writes(spool, monkeypatch, disk)
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, spool, 10, 2)
    try:
        await flusher.flush()  # connected
        await refuse_poison(database)
        counters.add(60, "poison", "", "", "", IMPRESSIONS, 3)
        await asyncio.wait_for(flusher.flush(), 10)  # dead-lettered, its write hung
        counters.add(60, "healthy", "", "", "", IMPRESSIONS, 4)
        await asyncio.wait_for(flusher.flush(), 10)  # applied, its write queued
        if answers == "before the shutdown":
            disk.set()
            await wait_for(lambda: written and not [*tmp_path.glob("*.batch")])
        await asyncio.wait_for(flusher.close(5.0), 10)
        # The spool is given up only with no write under way, which a process starting
        # meanwhile would take for a dead one's.
        owned = (tmp_path / "owners" / f"{spool.owner}.lock").exists()
        assert owned == (answers == "after it")
    finally:
        disk.set()
    assert await impressions(database) == {"healthy": 4}
    assert len(list((tmp_path / "dead-letter").glob("*.batch"))) == 1
    # The poison batch's write ends late, and its file goes; the healthy one's is not made.
    await wait_for(lambda: written and not [*tmp_path.glob("*.batch")])
    assert len(written) == 1 and not list(tmp_path.glob("*.partial"))


async def test_a_dead_letter_that_cannot_be_written_leaves_the_batch_pending(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL rejects a batch while its spool file is still being written, and the dead
    letter cannot be written (out of file descriptors): the batch stays pending, its file is
    kept once written, and the next flush sets it aside. It is never lost in between, and the
    database, which did its part, is not blamed."""
    spool = Spool(tmp_path, 1 << 30)
    disk = threading.Event()
    gate_writes(spool, monkeypatch, disk)
    dead_letter, failures = spool.dead_letter, [OSError(errno.EMFILE, "Too many open files")]

    def dead_letter_failing_once(batch: Batch, error: str) -> Path:
        if failures:
            threading.Timer(0.2, disk.set).start()  # the file is written just after
            raise failures.pop()
        return dead_letter(batch, error)

    monkeypatch.setattr(spool, "dead_letter", dead_letter_failing_once)
    metrics, counters = Metrics(), Counters()
    flusher = Flusher(counters, database, metrics, 1.0, spool, 10, 2)
    try:
        await flusher.flush()  # connected
        await refuse_poison(database)
        counters.add(60, "poison", "", "", "", IMPRESSIONS, 3)
        await flusher.flush()  # rejected, the dead letter failed: the batch waits
        assert flusher.pending_batches == 1 and not failures
        assert flusher.ready and metrics.flush_failures == metrics.dead_lettered == 0
    finally:
        disk.set()
    await wait_for(lambda: list(tmp_path.glob("*.batch")))  # its file, written meanwhile, kept
    await flusher.flush()
    assert metrics.dead_lettered == 1
    await flusher.close(5.0)
    assert flusher.pending_batches == 0 and not list(tmp_path.glob("*.batch"))
    (letter,) = (tmp_path / "dead-letter").glob("*.batch")
    rows = batch_rows(Batch.from_bytes(letter.read_bytes()))
    assert [row[1:6] for row in rows] == [("poison", "", "", "", 3)]


async def test_a_spool_file_that_cannot_be_read_for_now_waits(
    database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of file descriptors, say: the file stays for the next flush, not dead-lettered,
    and the database is not blamed; the error is logged once, not at every flush."""
    spool = Spool(tmp_path, 1 << 20)
    spool.write(batch_of((60, "later", "", "", "", 6, 0, 0, 0, 0, 0)))
    read = spool.read
    failures = [OSError(errno.EMFILE, "Too many open files")] * 3

    def read_failing(path: Path) -> Batch:
        if failures:
            raise failures.pop()
        return read(path)

    monkeypatch.setattr(spool, "read", read_failing)
    metrics = Metrics()
    flusher = Flusher(Counters(), database, metrics, 1.0, spool, 10, 1)
    await flusher.flush()
    assert flusher.ready and flusher.pending_batches == 1 and metrics.dead_lettered == 0
    assert await impressions(database) == {}
    await flusher.flush()
    await flusher.flush()
    assert flusher.pending_batches == 1 and caplog.text.count("cannot read spool file") == 1
    await flusher.flush()
    assert flusher.pending_batches == 0 and await impressions(database) == {"later": 6}
    await flusher.close(5.0)


async def test_the_ledger_is_not_pruned_past_a_file_another_worker_spooled(
    database: str, tmp_path: Path
) -> None:
    """After an outage longer than the ledger's days, the first worker back prunes; the
    batches its siblings spooled during the outage, in the folder they share, still apply."""
    day = 86400
    spool = Spool(tmp_path, 1 << 30)
    first = Flusher(Counters(), database, Metrics(), 1.0, spool, 10, 2, ledger_seconds=day)
    outage = batch_of((60, "sibling", "", "", "", 8, 0, 0, 0, 0, 0))
    spool_at(tmp_path, outage, 3 * day)  # by a sibling: the first does not know of it
    await first.flush()  # connects, prunes
    (horizon,) = await fetch(
        database, "SELECT extract(epoch FROM pruned_before) FROM ledger_horizon"
    )
    assert float(horizon[0]) < time.time() - 3 * day
    sibling = Flusher(Counters(), database, Metrics(), 1.0, Spool(tmp_path, 1 << 30), 10, 2)
    await sibling.flush()
    await sibling.close(5.0)
    await first.close(5.0)
    assert await impressions(database) == {"sibling": 8}


async def test_the_ledger_is_pruned_a_chunk_at_a_time(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "PRUNING_CHUNK", 2)
    connection = await storage.connect(database, 10.0)
    try:
        await connection.executemany(
            "INSERT INTO flush_batches (batch_id, row_count, applied_at) VALUES ($1, 1, $2)",
            [(uuid.uuid4(), datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)) for _ in range(5)]
            + [(kept := uuid.uuid4(), datetime.datetime.now(datetime.UTC))],
        )
        now = time.time()
        assert await storage.prune_ledger(connection, 86400, 0.0, now) == (2, False)  # budget
        assert await storage.prune_ledger(connection, 86400, 60.0, now) == (3, True)
    finally:
        await connection.close()
    assert [row[0] for row in await fetch(database, "SELECT batch_id FROM flush_batches")] == [kept]


async def test_a_flush_that_fails_on_a_bug_is_reported_and_the_next_one_goes_on(
    database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 0.05, Spool(tmp_path, 1 << 20), 10, 2)
    flush, bugs = flusher.flush, list[int]()

    async def a_bug_once() -> None:
        if not bugs:
            bugs.append(1)
            raise RuntimeError("a bug")
        await flush()

    flusher.flush = a_bug_once  # type: ignore[method-assign]
    counters.add(60, "kept", "", "", "", IMPRESSIONS, 3)
    running = asyncio.create_task(flusher.run())
    await wait_for(lambda: bugs and not len(counters) and not flusher.pending_batches)
    assert not running.done()
    await flusher.finish(running, 1.0)
    await flusher.close(5.0)
    assert "the flush failed; the next one tries again" in caplog.text
    assert await impressions(database) == {"kept": 3}
