"""The merge of a million keys that have rows, merge-joined against key by key.

    python -m loadtests.bench_merge [--rounds 3]

On a PostgreSQL cluster of its own, over one connection, it applies a window of 1,000,000
keys through ``storage.apply`` (ten batches of 100,000) to a bucket that already holds them,
the two ways in turn, round by round, each in a bucket of its own: as the server does
(``storage.merge_staged`` merge-joins a batch dense in the table), and with the merge join off
(key by key). It prints each one's time and PostgreSQL's CPU time, for two windows: every key
with a row, and 1% of them new, spread through the batches (the density probe should send
those key by key at little cost).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import uvloop

from _fastcount import COLUMNS, Counters
from loadtests.bench_flush import BUCKET, add_keys, database_cpu_time
from server import storage
from server.batch import Batch, seal
from server.config import positive_int
from server.embedded import EmbeddedPostgres

KEYS = 1_000_000
WINDOWS = {
    "every key with a row": range(KEYS),
    "1% of the keys new": [n for n in range(KEYS) if n % 101 != 7],
}


async def batches(bucket: int, numbers: Iterable[int]) -> list[Batch]:
    counters = Counters(max_keys=2 * KEYS)
    add_keys(counters, numbers, bucket)
    sealed: list[Batch] = []
    await seal(counters.swap(), sealed.append, [0] * len(COLUMNS))
    return sealed


async def measure(postgres: EmbeddedPostgres, rounds: int) -> None:
    connection = await storage.connect(postgres.dsn, 10.0)
    since = storage.MERGE_JOIN_SINCE
    bucket = BUCKET
    try:
        for window, stored in WINDOWS.items():
            for round_number in range(rounds):
                for way, joins in (("key by key", False), ("merge-joined", True)):
                    bucket += 60
                    for batch in await batches(bucket, stored):
                        await storage.apply(connection, batch)
                    await connection.execute("CHECKPOINT")
                    window_batches = await batches(bucket, range(KEYS))
                    storage.MERGE_JOIN_SINCE = since if joins else sys.maxsize
                    cpu = database_cpu_time(postgres)
                    started = time.perf_counter()
                    for batch in window_batches:
                        await storage.apply(connection, batch)
                    seconds = time.perf_counter() - started
                    cpu_s = (database_cpu_time(postgres) - cpu).total
                    storage.MERGE_JOIN_SINCE = since
                    print(
                        f"{window}, round {round_number + 1}, {way}: {seconds:.2f} s,"
                        f" PostgreSQL CPU {cpu_s:.2f} s",
                        flush=True,
                    )
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pixel-bench-merge-") as folder:
        postgres = EmbeddedPostgres(Path(folder) / "db")
        postgres.start()
        try:
            uvloop.run(measure(postgres, args.rounds))
        finally:
            postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
