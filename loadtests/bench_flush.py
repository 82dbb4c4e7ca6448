"""Flush figures: event-loop stall while flushing, time to flush a million keys, memory per key.

    python -m loadtests.bench_flush [--json flush.json]

On a PostgreSQL cluster of its own, with the flusher as the server runs it (two connections,
``--flush-connections``' default), it prints:
- resident memory per live key, with 1,000,000 keys held by the counter engine;
- the longest event-loop stall while the flusher seals and merges windows of 200,000 distinct
  keys (a 1 ms ticker measures how late it wakes): once with PostgreSQL pinned to a core of its
  own, as on a machine of its own, and once sharing every core with it;
- the time to seal, COPY and merge a window of 1,000,000 new keys, then the same keys again
  (every row exists: the merge updates them all, as when a bucket spans several flushes);
  medians of three rounds, each in a bucket of its own;
- for a window of 1,000,000 new keys, the sealing apart from the COPY and merge over one
  connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import uvloop

from _fastcount import IMPRESSIONS, Counters
from server import storage
from server.batch import Batch, seal_window
from server.embedded import EmbeddedPostgres
from server.flusher import Flusher
from server.metrics import Metrics, resident_bytes
from server.spool import Spool

BUCKET = 1_800_000_000
CONNECTIONS = 2  # --flush-connections' default
ROUNDS = 3


def fill(counters: Counters, keys: int, bucket: int = BUCKET) -> None:
    for n in range(keys):
        counters.add(
            bucket, f"campaign-{n % 50}", f"creative-{n % 997}", f"aff-{n}", "", IMPRESSIONS
        )


async def stall_while_flushing(
    dsn: str, spool: Path, keys: int, first_bucket: int
) -> tuple[float, float, float]:
    """(longest stall in ms, median seconds to flush ``keys`` new keys, median seconds to flush
    the same keys again) over ROUNDS rounds, each in a bucket of its own from
    ``first_bucket`` on, flushed as the server does."""
    counters = Counters(max_keys=2 * keys)
    flusher = Flusher(counters, dsn, Metrics(), 1.0, Spool(spool, 1 << 30), 10, CONNECTIONS)
    await flusher.flush()  # connect and migrate first
    worst = 0.0
    running = True

    async def ticker() -> None:
        # perf_counter, not loop.time(): uvloop's clock has millisecond steps.
        nonlocal worst
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    async def timed_flush() -> float:
        started = time.perf_counter()
        await flusher.flush()
        return time.perf_counter() - started

    new, again = [], []
    for round_number in range(ROUNDS):
        bucket = first_bucket + 60 * round_number
        fill(counters, keys, bucket)
        probe = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        new.append(await timed_flush())
        running = False
        await probe
        running = True
        # The same keys: every row exists, each merge is an update.
        fill(counters, keys, bucket)
        again.append(await timed_flush())
    await flusher.close(5.0)
    return worst * 1000, statistics.median(new), statistics.median(again)


async def phases(dsn: str, keys: int) -> tuple[float, float]:
    """(seconds to seal, seconds to apply over one connection) a window of ``keys`` new keys."""
    counters = Counters(max_keys=2 * keys)
    fill(counters, keys, bucket=BUCKET - 60)
    connection = await storage.connect(dsn, 10.0)
    try:
        started = time.perf_counter()
        batches: list[Batch] = []
        await asyncio.to_thread(seal_window, counters.swap(), batches.append)
        sealed = time.perf_counter() - started
        started = time.perf_counter()
        for batch in batches:
            await storage.apply(connection, batch)
        applied = time.perf_counter() - started
    finally:
        await connection.close()
    return sealed, applied


@contextlib.contextmanager
def database_on_its_own_core(postgres: EmbeddedPostgres) -> Iterator[None]:
    """Pins PostgreSQL (the postmaster and its processes; backends inherit it) to the last core
    and this process to the others, as when the database runs on a machine of its own: the
    flusher's two connections otherwise keep every core of a small machine busy, and the
    event loop waits for the CPU, not for anything of its own."""
    cores = os.sched_getaffinity(0)
    postmaster = int((postgres.pgdata / "postmaster.pid").read_text().split()[0])
    family = [postmaster, *_children(postmaster)]
    own = {max(cores)}
    for pid in family:
        os.sched_setaffinity(pid, own)
    os.sched_setaffinity(0, cores - own)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        for pid in [postmaster, *_children(postmaster)]:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, cores)


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def measure() -> dict[str, float]:
    figures = {}
    # Memory first, in a process that has not freed any heap yet to reuse.
    counters = Counters(max_keys=2_000_000)
    fill(counters, 1)
    before = resident_bytes()
    fill(counters, 1_000_000)
    figures["bytes_per_key"] = (resident_bytes() - before) / 1_000_000
    print(f"resident memory: {figures['bytes_per_key']:.0f} bytes per live key at 1,000,000 keys")
    del counters
    with tempfile.TemporaryDirectory(prefix="pixel-bench-flush-") as name:
        folder = Path(name)
        postgres = EmbeddedPostgres(folder / "db")
        postgres.start()
        try:
            with database_on_its_own_core(postgres):
                stall, _, _ = uvloop.run(
                    stall_while_flushing(postgres.dsn, folder / "p", 200_000, BUCKET - 3600)
                )
            figures.update(stall_ms_200k_own_core=stall)
            print(
                f"200,000 keys, PostgreSQL on a core of its own: longest event-loop stall"
                f" {stall:.1f} ms (of {ROUNDS} flushes)"
            )
            stall, new, again = uvloop.run(
                stall_while_flushing(postgres.dsn, folder / "s", 200_000, BUCKET)
            )
            figures.update(stall_ms_200k=stall, flush_s_200k=new, reflush_s_200k=again)
            print(
                f"200,000 keys, PostgreSQL on every core: longest event-loop stall {stall:.1f} ms;"
                f" flushed in {new:.2f} s, again in {again:.2f} s (medians)"
            )
            _, new, again = uvloop.run(
                stall_while_flushing(postgres.dsn, folder / "m", 1_000_000, BUCKET + 3600)
            )
            figures.update(flush_s_1m=new, reflush_s_1m=again)
            print(
                f"1,000,000 keys: flushed (sealed, copied, merged) in {new:.2f} s;"
                f" the same keys again (every row updated) in {again:.2f} s"
                f" (medians of {ROUNDS})"
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
