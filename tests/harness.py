"""Database helpers for the tests: fresh databases, queries, and a proxy to cut one off."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiohttp
import asyncpg

from _fastcount import COLUMNS, Counters
from loadtests.accounting import totals_by_key
from loadtests.processes import PixelServer, free_port
from server.batch import POSTGRES_EPOCH, Batch, seal_window

__all__ = [
    "FIRST_BUCKET",
    "LAST_BUCKET",
    "DatabaseProxy",
    "PixelServer",
    "Row",
    "batch_of",
    "batch_rows",
    "copy_rows",
    "fetch",
    "free_port",
    "insert_counts",
    "metric",
    "scrape",
    "totals_by_key",
    "wait_for",
    "with_database",
]


# The first and last buckets PostgreSQL's timestamptz holds, in unix seconds:
# 4714-11-24 00:00:00 BC and 294276-12-31 23:59:59 UTC.
FIRST_BUCKET = -210_866_803_200
LAST_BUCKET = 9_224_318_015_999


async def wait_for(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Waits until ``condition()`` holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def scrape(server: PixelServer) -> str:
    """The text of the server's ``/metrics``, checked to be Prometheus' text format."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.admin_url}/metrics") as answer,
    ):
        assert answer.status == 200
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return await answer.text()


def metric(text: str, name: str, *labels: str) -> float:
    """The value of one sample in a Prometheus text page; 0 where it has none. Labels are
    given as ``key="value"`` strings, in the order the page shows them."""
    sample = f"{name}{{{','.join(labels)}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(sample):
            return float(line[len(sample) :])
    return 0


def with_database(dsn: str, name: str) -> str:
    """The same server's DSN for database ``name``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def insert_counts(dsn: str, records: Sequence[tuple[Any, ...]]) -> None:
    """Adds rows to pixel_counts as they are: ``(bucket, campaign, creative, affiliate, sub_id,
    impressions, givt_impressions, measurable, viewable, clicks, givt_clicks)``."""
    connection = await asyncpg.connect(dsn)
    try:
        columns = ["bucket", "campaign", "creative", "affiliate", "sub_id", *COLUMNS]
        await connection.copy_records_to_table("pixel_counts", records=records, columns=columns)
    finally:
        await connection.close()


Row = tuple[int, str, str, str, str, int, int, int, int, int, int]


def batch_of(*rows: Row) -> Batch:
    """One sealed batch of these rows, as the flusher makes it (through the counter engine;
    so keys that repeat are added up)."""
    counters = Counters()
    for bucket, campaign, creative, affiliate, sub_id, *counts in rows:
        for field, n in enumerate(counts):
            if n:
                counters.add(bucket, campaign, creative, affiliate, sub_id, field, n)
    batches: list[Batch] = []
    seal_window(counters.swap(), batches.append)
    (batch,) = batches
    return batch


def copy_rows(data: bytes) -> list[Row]:
    """Rows back from binary COPY tuples, by PostgreSQL's documented layout: a 16-bit field
    count, then each field as a 32-bit length and its bytes (bigint: 8 bytes, big-endian;
    timestamptz: a bigint of microseconds since 2000-01-01 UTC, given back as unix seconds)."""
    rows: list[Row] = []
    at = 0
    while at < len(data):
        (fields,) = struct.unpack_from(">h", data, at)
        assert fields == 11
        at += 2
        values: list[bytes] = []
        for _ in range(fields):
            (length,) = struct.unpack_from(">i", data, at)
            assert length >= 0  # never NULL
            values.append(data[at + 4 : at + 4 + length])
            at += 4 + length
        bucket, campaign, creative, affiliate, sub_id, a, b, c, d, e, f = values
        (micros,) = struct.unpack(">q", bucket)
        when = micros // 1_000_000 + POSTGRES_EPOCH
        dims = (dim.decode() for dim in (campaign, creative, affiliate, sub_id))
        counts = (struct.unpack(">q", value)[0] for value in (a, b, c, d, e, f))
        rows.append((when, *dims, *counts))
    return rows


def batch_rows(batch: Batch) -> list[Row]:
    """A batch's rows, decoded from its binary COPY tuples."""
    rows = copy_rows(batch.tuples)
    assert len(rows) == batch.rows
    return rows


async def fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    connection = await asyncpg.connect(dsn)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


class DatabaseProxy:
    """A TCP proxy in front of the test PostgreSQL, to cut the database off and bring it back.

    While closed, connections to its port are refused, as they are when a database is down.
    """

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self.port = free_port()
        self._database = parts.path.lstrip("/")
        options = dict(parse_qsl(parts.query))
        port = parts.port or int(options.get("port", 5432))
        self._tcp = (parts.hostname, port) if parts.hostname else None
        self._unix = f"{options.get('host', '/tmp')}/.s.PGSQL.{port}"
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        # Set it to cut the connection right after the next COMMIT succeeds, before its answer
        # reaches the client: the ambiguous failure of a commit.
        self.cut_after_next_commit = False
        self.commits_cut = 0
        # Cleared, the database's answers are held back, as when it hangs.
        self._answering = asyncio.Event()
        self._answering.set()

    def dsn(self, password: str = "") -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://postgres{secret}@127.0.0.1:{self.port}/{self._database}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    def hang(self) -> None:
        """Holds the database's answers back, the connections staying open, until
        :meth:`close`: the database hangs."""
        self._answering.clear()

    async def close(self) -> None:
        """Stops listening and cuts every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            if self._tcp is not None:
                up_reader, up_writer = await asyncio.open_connection(*self._tcp)
            else:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            try:
                await asyncio.gather(
                    _pipe(reader, up_writer), self._answers(up_reader, writer, up_writer)
                )
            finally:
                up_writer.close()
        except (asyncio.CancelledError, OSError):
            pass  # cut by close(), or the database went away: the client sees the drop
        finally:
            writer.close()
            self._links.discard(task)

    async def _answers(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """The database's answers to the client, unless a COMMIT's answer is to be cut."""
        while data := await reader.read(65536):
            if self.cut_after_next_commit and _COMMIT_COMPLETE in data:
                self.cut_after_next_commit = False
                self.commits_cut += 1
                upstream.close()
                writer.transport.abort()
                return
            await self._answering.wait()
            writer.write(data)
            await writer.drain()
        writer.close()


# CommandComplete for COMMIT in the PostgreSQL wire protocol: 'C', length 11, "COMMIT\0".
_COMMIT_COMPLETE = b"C\x00\x00\x00\x0bCOMMIT\x00"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
