"""Conservation: every impression a client sent is in pixel_counts exactly once."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from _fastcount import IMPRESSIONS, Counters
from server import batch, storage
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool
from tests.harness import PixelServer, Row, batch_of, fetch, totals_by_key

REQUESTS = 20_000
CONCURRENCY = 32


def make_keys(count: int) -> list[tuple[str, str, str, str]]:
    """Distinct keys over a realistic spread, some with non-ASCII and reserved characters."""
    return [
        (f"camp-{n % 7}", f"creative {n % 31}/é", f"aff&{n % 53}", f"sub={n}") for n in range(count)
    ]


async def send(server: PixelServer, plan: list[tuple[str, str, str, str]]) -> None:
    queue: asyncio.Queue[tuple[str, str, str, str]] = asyncio.Queue()
    for key in plan:
        queue.put_nowait(key)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            cid, crid, aff, sub = queue.get_nowait()
            query = urlencode(
                {"cid": cid, "crid": crid, "aff": aff, "sub": sub, "cb": random.random()}
            )
            async with session.get(f"{server.base_url}/i.gif?{query}") as answer:
                assert answer.status == 200
                assert len(await answer.read()) == 43

    headers = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) conservation-test"}
    async with aiohttp.ClientSession(headers=headers) as session:
        await asyncio.gather(*(client(session) for _ in range(CONCURRENCY)))


async def test_every_sent_impression_is_stored_exactly_once(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    # One-second buckets and fast flushes: the run spans several buckets and many batches.
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.2", "--bucket-seconds=1")
    keys = make_keys(400)
    rng = random.Random(7)
    plan = [rng.choice(keys) for _ in range(REQUESTS)]

    await send(server, plan)
    assert server.terminate() == 0, server.log()

    sent = collections.Counter(plan)
    stored = await totals_by_key(database)
    assert {key: counts[0] for key, counts in stored.items()} == dict(sent)
    assert all(counts[1:] == (0, 0, 0, 0, 0) for counts in stored.values())
    (buckets,) = await fetch(database, "SELECT count(DISTINCT bucket) FROM pixel_counts")
    assert buckets[0] > 1
    (batches,) = await fetch(database, "SELECT count(*) FROM flush_batches")
    assert batches[0] > 1


async def test_sigterm_under_load_keeps_every_answered_impression(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.2")
    answered: collections.Counter[str] = collections.Counter()

    async def client(session: aiohttp.ClientSession, number: int) -> None:
        # Bounded: at most 5,000 requests per client; it stops at the first refused one.
        for _ in range(5_000):
            try:
                async with session.get(f"{server.base_url}/i.gif?cid=c{number}") as answer:
                    if answer.status != 200 or len(await answer.read()) != 43:
                        return
            except aiohttp.ClientError:
                return
            answered[f"c{number}"] += 1

    headers = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) shutdown-test"}
    async with aiohttp.ClientSession(headers=headers) as session:
        clients = asyncio.gather(*(client(session, n) for n in range(16)))
        await asyncio.sleep(1.0)
        status = asyncio.create_task(asyncio.to_thread(server.terminate))
        await clients
        assert await status == 0, server.log()

    stored = await totals_by_key(database)
    assert sum(answered.values()) > 100
    assert {key[0]: counts[0] for key, counts in stored.items()} == dict(answered)
    assert "GET /i.gif" not in server.log(), "access logging is off by default"


async def test_key_cap_sends_new_keys_to_the_overflow_row_and_totals_add_up(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    # One window (long flush interval) and one bucket (a day wide): exactly 10 keys get a row.
    server = pixel_server(
        f"--dsn={database}", "--flush-interval=60", "--bucket-seconds=86400", "--max-keys=10"
    )
    headers = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) overflow-test"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for n in range(50):
            for _ in range(3):
                async with session.get(f"{server.base_url}/i.gif?cid=k{n}&sub=s") as answer:
                    assert answer.status == 200
    assert server.terminate() == 0, server.log()
    stored = await totals_by_key(database)
    overflow = stored.pop(("__overflow__", "", "", ""))
    assert len(stored) == 10
    assert all(counts[0] == 3 for counts in stored.values())
    assert overflow[0] == 40 * 3
    assert "__overflow__" in server.log()


async def test_a_window_bigger_than_a_batch_is_merged_exactly_over_every_connection(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch, "BATCH_ROWS", 7)
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 20), 10, 3)
    await flusher.flush()  # connects all three
    keys = make_keys(100)
    for n, (cid, crid, aff, sub) in enumerate(keys):
        counters.add(1_800_000_000, cid, crid, aff, sub, IMPRESSIONS, n + 1)
    await flusher.flush()
    for cid, crid, aff, sub in keys:  # the same rows again: every merge an update
        counters.add(1_800_000_000, cid, crid, aff, sub, IMPRESSIONS)
    await flusher.flush()
    await flusher.close(5.0)

    stored = {key: counts[0] for key, counts in (await totals_by_key(database)).items()}
    assert stored == {key: n + 2 for n, key in enumerate(keys)}
    (batches,) = await fetch(database, "SELECT count(*) FROM flush_batches WHERE row_count <= 7")
    assert batches[0] == 2 * 15  # ceil(100 / 7) per window
    assert flusher.pending_batches == 0


COPIED, MERGED = ["pixel_counts"], ["pixel_staging"]


@pytest.mark.parametrize(
    ("existing", "copies"),
    [
        ([], COPIED),  # every key new: copied straight in
        (["a"], MERGED),  # the first key has a row: merged
        (["m"], COPIED + MERGED),  # a key between new first and last: the copy fails on it
        (["z"], MERGED),  # the last key has a row: merged
        (["a", "m", "z"], MERGED),
    ],
)
async def test_a_batch_of_new_keys_is_copied_and_one_with_any_existing_key_merged(
    database: str, existing: list[str], copies: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    campaigns = ["a", "b0", "b1", "m", "y0", "y1", "z"]
    tables: list[str] = []
    copy_to_table = asyncpg.Connection.copy_to_table

    async def noted_copy(self: asyncpg.Connection, table_name: str, **kwargs: Any) -> Any:
        tables.append(table_name)
        return await copy_to_table(self, table_name, **kwargs)

    connection = await storage.connect(database, 10.0)
    try:
        for campaign in existing:
            before = batch_of((3600, campaign, "", "", "", 5, 0, 0, 0, 1, 0))
            assert await storage.apply(connection, before)
        rows = [(3600, campaign, "", "", "", 1, 0, 2, 1, 0, 0) for campaign in campaigns]
        batch = batch_of(*rows)
        monkeypatch.setattr(asyncpg.Connection, "copy_to_table", noted_copy)
        assert await storage.apply(connection, batch)
        assert tables == copies  # where the batch's rows went
        assert not await storage.apply(connection, batch)  # the ledger: once only
    finally:
        await connection.close()
    stored = await fetch(
        database,
        "SELECT extract(epoch FROM bucket)::bigint, campaign, impressions, measurable, viewable,"
        " clicks FROM pixel_counts ORDER BY campaign",
    )
    assert [tuple(row) for row in stored] == [
        (3600, campaign, 6 if campaign in existing else 1, 2, 1, int(campaign in existing))
        for campaign in campaigns
    ]


def affiliates(*names: str) -> list[Row]:
    """One impression for each of these affiliates, of one campaign in one bucket."""
    return [(3600, "c", "", name, "", 1, 0, 0, 0, 0, 0) for name in names]


async def merged(connection: asyncpg.Connection, rows: list[Row]) -> bool:
    """Stages a batch of these rows and merges it in a transaction of its own; returns whether
    it was merge-joined."""
    staged = batch_of(*rows)
    async with connection.transaction():
        await connection.copy_to_table(
            "pixel_staging", source=storage.copy_file(staged), format="binary"
        )
        return await storage.merge_staged(connection, staged)


# A batch of 100 keys, aff-00000, aff-00010, ... aff-00990.
OURS = [f"aff-{10 * n:05}" for n in range(100)]


@pytest.mark.parametrize(
    ("stored", "others", "tried", "joined"),
    [
        # The batch's keys all have rows: merge-joined.
        (range(100), [], True, True),
        # Some of its keys are new, in the middle: the range holds fewer rows; key by key.
        ([*range(40), *range(60, 100)], [], False, False),
        # Another writer's key between its first two, a pair sampled: key by key.
        (range(100), ["aff-00005"], False, False),
        # A block of others' keys between two of the batch's, as many as its own: key by key.
        (range(100), [f"aff-00500-{n:03}" for n in range(100)], False, False),
        # ... of fewer than its own: merge-joined.
        (range(100), [f"aff-00500-{n:03}" for n in range(99)], True, True),
        # ... and one of its keys new, unsampled: the merge join is rolled back, key by key.
        ([*range(50), *range(51, 100)], [f"aff-00500-{n:03}" for n in range(50)], True, False),
        # ... a sampled one (its second): key by key.
        ([0, *range(2, 100)], [f"aff-00500-{n:03}" for n in range(50)], False, False),
    ],
)
async def test_a_batch_dense_in_the_table_is_merge_joined_and_its_counts_exact(
    database: str,
    stored: Sequence[int],
    others: list[str],
    tried: bool,
    joined: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    statements: list[str] = []
    execute = asyncpg.Connection.execute

    async def noted_execute(self: asyncpg.Connection, query: str, *args: Any) -> Any:
        statements.append(query)
        return await execute(self, query, *args)

    connection = await storage.connect(database, 10.0)
    try:
        for names in (others, [OURS[n] for n in stored]):
            if names:
                assert await storage.apply(connection, batch_of(*affiliates(*names)))
        joins = connection.get_server_version().major >= storage.MERGE_JOIN_SINCE
        monkeypatch.setattr(asyncpg.Connection, "execute", noted_execute)
        assert await merged(connection, affiliates(*OURS)) is (joined and joins)
        assert (storage._MERGE_JOINED in statements) is (tried and joins)
    finally:
        await connection.close()
    expected = dict.fromkeys(others, 1) | {name: 1 + (n in stored) for n, name in enumerate(OURS)}
    rows = await fetch(database, "SELECT affiliate, impressions FROM pixel_counts")
    assert dict(rows) == expected


async def test_a_merge_join_that_waits_for_another_writers_row_adds_to_it(
    database: str,
) -> None:
    holder = await asyncpg.connect(database)
    merger = await storage.connect(database, 10.0)
    try:
        if merger.get_server_version().major < storage.MERGE_JOIN_SINCE:
            pytest.skip("this PostgreSQL merges key by key")
        assert await storage.apply(merger, batch_of(*affiliates(*OURS)))
        async with holder.transaction():
            await holder.execute(
                "UPDATE pixel_counts SET impressions = impressions + 5 WHERE affiliate = $1",
                OURS[50],
            )
            merging = asyncio.create_task(merged(merger, affiliates(*OURS)))
            waiting = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1"
            pid = merger.get_server_pid()

            async def merger_waits() -> bool:
                return bool(await holder.fetchval(waiting, pid) == "Lock")

            for _ in range(500):
                if await merger_waits():
                    break
                await asyncio.sleep(0.01)
            assert await merger_waits()  # for the row the holder updated
        assert await merging  # merge-joined, the holder's update in the row it updated
    finally:
        await merger.close()
        await holder.close()
    rows = await fetch(database, "SELECT affiliate, impressions FROM pixel_counts")
    assert dict(rows) == {name: 7 if name == OURS[50] else 2 for name in OURS}


async def test_writers_merge_joining_the_same_keys_at_once_count_each_once(
    database: str,
) -> None:
    rounds = 20
    first = await storage.connect(database, 10.0)
    try:
        assert await storage.apply(first, batch_of(*affiliates(*OURS)))
        joins = first.get_server_version().major >= storage.MERGE_JOIN_SINCE
    finally:
        await first.close()

    async def writer() -> list[bool]:
        connection = await storage.connect(database, 10.0)
        try:
            return [await merged(connection, affiliates(*OURS)) for _ in range(rounds)]
        finally:
            await connection.close()

    ways = await asyncio.gather(*(writer() for _ in range(3)))
    assert all(joined is joins for way in ways for joined in way)
    rows = await fetch(database, "SELECT affiliate, impressions FROM pixel_counts")
    assert dict(rows) == dict.fromkeys(OURS, 1 + 3 * rounds)


async def test_the_probe_finds_a_first_or_last_key_that_has_a_row(database: str) -> None:
    connection = await storage.connect(database, 10.0)
    try:
        old = batch_of((1_700_000_040, "m", "é", "", "", 1, 0, 0, 0, 0, 0))
        assert await storage.first_and_last_are_new(connection, old)
        assert await storage.apply(connection, old)
        assert not await storage.first_and_last_are_new(connection, old)
        for rows in (
            [("m", "é"), ("z", "")],  # first
            [("a", ""), ("m", "é")],  # last
        ):
            batch = batch_of(*((1_700_000_040, c, cr, "", "", 1, 0, 0, 0, 0, 0) for c, cr in rows))
            assert not await storage.first_and_last_are_new(connection, batch)
        around = batch_of(
            (1_700_000_040, "a", "", "", "", 1, 0, 0, 0, 0, 0),
            (1_700_000_040, "m", "é", "", "", 1, 0, 0, 0, 0, 0),
            (1_700_000_040, "z", "", "", "", 1, 0, 0, 0, 0, 0),
            (1_700_000_100, "m", "é", "", "", 1, 0, 0, 0, 0, 0),  # another bucket
        )
        assert await storage.first_and_last_are_new(connection, around)
        far = batch_of((300_000_000_000, "m", "é", "", "", 1, 0, 0, 0, 0, 0))
        assert not await storage.first_and_last_are_new(connection, far)  # past year 9999
    finally:
        await connection.close()


async def test_a_flush_connection_stages_in_64_mb_of_temp_buffers_or_more(database: str) -> None:
    """The staging table's buffers are 64 MB (a batch of 100,000 rows of the longest values
    fits), or what the server or the DSN gives where that is more."""
    staging = storage.STAGING_BUFFERS
    for given in (None, staging >> 6, staging * 2):
        parts = urlsplit(database)
        setting = [] if given is None else [f"temp_buffers={given >> 10}kB"]
        dsn = urlunsplit(parts._replace(query="&".join([*filter(None, [parts.query]), *setting])))
        plain = await asyncpg.connect(dsn)
        try:
            before = await plain.fetchval(TEMP_BUFFERS)
        finally:
            await plain.close()
        connection = await storage.connect(dsn, 10.0)
        try:
            assert await connection.fetchval(TEMP_BUFFERS) == max(before, staging)
            await applied_twice(connection)
        finally:
            await connection.close()
    rows = await fetch(database, "SELECT affiliate, impressions FROM pixel_counts")
    assert dict(rows) == dict.fromkeys(OURS, 6)


async def test_a_session_that_used_temporary_tables_keeps_its_buffers(database: str) -> None:
    """As a server connection a pooler hands on may have: PostgreSQL refuses to change them
    then, and the flusher stages in them as they are."""
    await (await storage.connect(database, 10.0)).close()  # the schema
    connection = await asyncpg.connect(database, server_settings={"temp_buffers": "8MB"})
    try:
        await connection.execute("CREATE TEMPORARY TABLE used (n int); INSERT INTO used VALUES (1)")
        await storage.prepare_staging(connection)
        assert await connection.fetchval(TEMP_BUFFERS) == 8 << 20
        await applied_twice(connection)
    finally:
        await connection.close()
    rows = await fetch(database, "SELECT affiliate, impressions FROM pixel_counts")
    assert dict(rows) == dict.fromkeys(OURS, 2)


TEMP_BUFFERS = "SELECT pg_size_bytes(current_setting('temp_buffers'))"


async def applied_twice(connection: asyncpg.Connection) -> None:
    """Applies a batch of one impression for each of OURS: copied into the table the first
    time, merged through the staging table the second."""
    for _ in range(2):
        assert await storage.apply(connection, batch_of(*affiliates(*OURS)))
