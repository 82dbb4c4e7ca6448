"""Flush figures: event-loop stall while flushing, time to flush a million keys, memory per key.

    python -m loadtests.bench_flush

On a PostgreSQL cluster of its own it prints:
- the longest event-loop stall while the flusher seals and merges a window of 200,000 distinct
  keys (a 1 ms ticker measures how late it wakes);
- the time to seal, COPY and merge a window of 1,000,000 distinct keys, and the same window's
  sealing apart from its COPY and merge;
- resident memory per live key, with 1,000,000 keys held by the counter engine.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import uvloop

from _fastcount import COLUMNS, IMPRESSIONS, Counters
from server import storage
from server.batch import Batch, collector_paused, seal
from server.embedded import EmbeddedPostgres
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool

BUCKET = 1_800_000_000


def fill(counters: Counters, keys: int) -> None:
    for n in range(keys):
        counters.add(
            BUCKET, f"campaign-{n % 50}", f"creative-{n % 997}", f"aff-{n}", "", IMPRESSIONS
        )


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def stall_while_flushing(dsn: str, spool: Path, keys: int) -> tuple[float, float]:
    """(longest stall in ms, flush seconds) for one window of ``keys`` distinct keys."""
    counters = Counters(max_keys=2 * keys)
    flusher = Flusher(counters, dsn, Metrics(), 1.0, Spool(spool, 1 << 30), 10)
    await flusher.flush()  # connect and migrate first
    fill(counters, keys)
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        loop = asyncio.get_running_loop()
        while running:
            before = loop.time()
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - before - 0.001)

    probe = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await flusher.flush()
    elapsed = time.perf_counter() - started
    running = False
    await probe
    await flusher.close(5.0)
    return worst * 1000, elapsed


async def phases(dsn: str, keys: int) -> tuple[float, float]:
    """(seconds to seal, seconds to COPY and merge) one window of ``keys`` distinct keys."""
    counters = Counters(max_keys=2 * keys)
    fill(counters, keys)
    batch = Batch(uuid.uuid4(), [])
    connection = await storage.connect(dsn, 10.0)
    try:
        with collector_paused():
            started = time.perf_counter()
            await seal(counters.swap(), batch.rows, [0] * len(COLUMNS))
            sealed = time.perf_counter() - started
            started = time.perf_counter()
            await storage.apply(connection, batch)
            applied = time.perf_counter() - started
    finally:
        await connection.close()
    return sealed, applied


def main() -> int:
    # Memory first, in a process that has not freed any heap yet to reuse.
    counters = Counters(max_keys=2_000_000)
    fill(counters, 1)
    before = rss_bytes()
    fill(counters, 1_000_000)
    per_key = (rss_bytes() - before) / 1_000_000
    print(f"resident memory: {per_key:.0f} bytes per live key at 1,000,000 keys")
    del counters
    with tempfile.TemporaryDirectory(prefix="pixel-bench-flush-") as name:
        folder = Path(name)
        postgres = EmbeddedPostgres(folder / "db")
        postgres.start()
        try:
            stall, small = uvloop.run(stall_while_flushing(postgres.dsn, folder / "s1", 200_000))
            print(f"200,000 keys: longest event-loop stall {stall:.1f} ms, flush {small:.2f} s")
            _, big = uvloop.run(stall_while_flushing(postgres.dsn, folder / "s2", 1_000_000))
            print(f"1,000,000 keys: sealed, copied and merged in {big:.2f} s")
            sealed, applied = uvloop.run(phases(postgres.dsn, 1_000_000))
            print(
                f"1,000,000 keys again: sealed in {sealed:.2f} s, then applied in {applied:.2f} s"
            )
        finally:
            postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
