"""Flush figures: event-loop stall while flushing, time to flush a million keys, memory per key.

    python -m loadtests.bench_flush [--json flush.json]

On a PostgreSQL cluster of its own, with the flusher as the server runs it (two connections,
``--flush-connections``' default), it prints:
- resident memory per live key, with 1,000,000 keys held by the counter engine;
- the longest event-loop stall while the flusher seals and merges a window of 200,000 distinct
  keys (a 1 ms ticker measures how late it wakes);
- the time to seal, COPY and merge a window of 1,000,000 new keys, then the same keys again
  (every row exists: the merge updates them all, as when a bucket spans several flushes);
- for a window of 1,000,000 new keys, the sealing apart from the COPY and merge over one
  connection.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

import orjson
import uvloop

from _fastcount import IMPRESSIONS, Counters
from server import storage
from server.batch import seal_window
from server.embedded import EmbeddedPostgres
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool

BUCKET = 1_800_000_000
CONNECTIONS = 2  # --flush-connections' default


def fill(counters: Counters, keys: int, bucket: int = BUCKET) -> None:
    for n in range(keys):
        counters.add(
            bucket, f"campaign-{n % 50}", f"creative-{n % 997}", f"aff-{n}", "", IMPRESSIONS
        )


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def stall_while_flushing(dsn: str, spool: Path, keys: int) -> tuple[float, float, float]:
    """(longest stall in ms, seconds to flush ``keys`` new keys, seconds to flush them again)
    for windows of ``keys`` distinct keys, flushed as the server does."""
    counters = Counters(max_keys=2 * keys)
    flusher = Flusher(counters, dsn, Metrics(), 1.0, Spool(spool, 1 << 30), 10, CONNECTIONS)
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
    new = time.perf_counter() - started
    running = False
    await probe
    fill(counters, keys)  # the same keys: every row exists, each merge is an update
    started = time.perf_counter()
    await flusher.flush()
    again = time.perf_counter() - started
    await flusher.close(5.0)
    return worst * 1000, new, again


async def phases(dsn: str, keys: int) -> tuple[float, float]:
    """(seconds to seal, seconds to apply over one connection) a window of ``keys`` new keys."""
    counters = Counters(max_keys=2 * keys)
    fill(counters, keys, bucket=BUCKET + 60)
    connection = await storage.connect(dsn, 10.0)
    try:
        started = time.perf_counter()
        batches, _ = await asyncio.to_thread(seal_window, counters.swap())
        sealed = time.perf_counter() - started
        started = time.perf_counter()
        for batch in batches:
            await storage.apply(connection, batch)
        applied = time.perf_counter() - started
    finally:
        await connection.close()
    return sealed, applied


def measure() -> dict[str, float]:
    figures = {}
    # Memory first, in a process that has not freed any heap yet to reuse.
    counters = Counters(max_keys=2_000_000)
    fill(counters, 1)
    before = rss_bytes()
    fill(counters, 1_000_000)
    figures["bytes_per_key"] = (rss_bytes() - before) / 1_000_000
    print(f"resident memory: {figures['bytes_per_key']:.0f} bytes per live key at 1,000,000 keys")
    del counters
    with tempfile.TemporaryDirectory(prefix="pixel-bench-flush-") as name:
        folder = Path(name)
        postgres = EmbeddedPostgres(folder / "db")
        postgres.start()
        try:
            stall, new, again = uvloop.run(
                stall_while_flushing(postgres.dsn, folder / "s", 200_000)
            )
            figures.update(stall_ms_200k=stall, flush_s_200k=new, reflush_s_200k=again)
            print(
                f"200,000 keys: longest event-loop stall {stall:.1f} ms;"
                f" flushed in {new:.2f} s, again in {again:.2f} s"
            )
            _, new, again = uvloop.run(stall_while_flushing(postgres.dsn, folder / "m", 1_000_000))
            figures.update(flush_s_1m=new, reflush_s_1m=again)
            print(
                f"1,000,000 keys: flushed (sealed, copied, merged) in {new:.2f} s;"
                f" the same keys again (every row updated) in {again:.2f} s"
            )
            sealed, applied = uvloop.run(phases(postgres.dsn, 1_000_000))
            figures.update(seal_s_1m=sealed, apply_one_connection_s_1m=applied)
            print(
                f"1,000,000 new keys, by phase: sealed in {sealed:.2f} s,"
                f" applied over one connection in {applied:.2f} s"
            )
        finally:
            postgres.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = measure()
    if args.json:
        args.json.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
