"""Flush figures: event-loop stall while flushing, time to flush a million keys, memory per key.

    python -m loadtests.bench_flush [--stalls-only | --million-only] [--rounds 3]
                                    [--warm-memory MIB] [--json flush.json]

On a PostgreSQL cluster of its own, with the flusher as the server runs it (two connections,
``--flush-connections``' default), it prints:
- resident memory per live key, with 1,000,000 keys held by the counter engine;
- the longest event-loop stall while the flusher seals and applies windows of 200,000 distinct
  keys, new and then again (a 1 ms ticker measures how late it wakes): once with PostgreSQL
  pinned to a core of its own, as on a machine of its own, and once sharing every core with it;
  and, as a control, the longest with no flush, PostgreSQL spinning on as many connections for
  as long as the flushes took: what the machine adds without the flusher's help;
- the time to seal and apply a window of 1,000,000 new keys (copied straight into the table),
  then the same keys again (every row exists: the merge updates them all, as when a bucket
  spans several flushes);
  medians of ``--rounds`` rounds, each in a bucket of its own; and PostgreSQL's CPU time for
  each, which shows how much of the machine the database took; then, round by round, each
  flush's time, the WAL it wrote, how much the page cache grew (Cached and Buffers, less
  Shmem, in /proc/meminfo) and PostgreSQL's CPU time in user mode and in the kernel (a flush
  just after a checkpoint writes more WAL: whole pages; the slow rounds' extra time has been
  PostgreSQL's time in the kernel, README: "Flush figures: the slow rounds' time in the kernel");
- for a window of 1,000,000 new keys, the sealing apart from applying the batches over one
  connection.

``--stalls-only`` measures the 200,000-key runs alone: their stalls, their controls and how long
their flushes took; ``--million-only`` the million-key flushes alone. ``--warm-memory MIB``
touches and frees that many MiB of memory before each million-key flush, untimed
(:func:`warm_memory`): a lab check of how much a virtual machine's memory adds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import asyncpg
import orjson
import uvloop

from _fastcount import COLUMNS, IMPRESSIONS, Counters
from loadtests.processes import stat_fields
from server import storage
from server.batch import Batch, seal
from server.config import positive_int
from server.embedded import EmbeddedPostgres
from server.flusher import Flusher
from server.metrics import Metrics, resident_bytes
from server.spool import Spool

BUCKET = 1_800_000_000
CONNECTIONS = 2  # --flush-connections' default
ROUNDS = 3


def fill(counters: Counters, keys: int, bucket: int = BUCKET) -> None:
    add_keys(counters, range(keys), bucket)


def add_keys(counters: Counters, numbers: Iterable[int], bucket: int) -> None:
    """One impression for each key numbered: 50 campaigns, 997 creatives, an affiliate each."""
    for n in numbers:
        counters.add(
            bucket, f"campaign-{n % 50}", f"creative-{n % 997}", f"aff-{n}", "", IMPRESSIONS
        )


@dataclasses.dataclass(frozen=True)
class CpuTime:
    """CPU seconds in user mode and in the kernel."""

    user: float
    system: float

    def __sub__(self, other: CpuTime) -> CpuTime:
        return CpuTime(self.user - other.user, self.system - other.system)

    @property
    def total(self) -> float:
        return self.user + self.system


@dataclasses.dataclass
class Flush:
    """One timed flush: its seconds; the WAL bytes it wrote (more after a checkpoint, when the
    first change to each page writes the whole page); how much the page cache grew; and
    PostgreSQL's CPU time for it."""

    seconds: float
    wal_bytes: int
    cache_bytes: int
    cpu: CpuTime

    def __str__(self) -> str:
        return (
            f"{self.seconds:.2f} s ({self.wal_bytes / 1e6:.0f} MB of WAL, page cache"
            f" {self.cache_bytes / 1e6:+.0f} MB; PostgreSQL's CPU {self.cpu.user:.2f} s user,"
            f" {self.cpu.system:.2f} s system)"
        )


@dataclasses.dataclass
class Flushes:
    """What :func:`stall_while_flushing` measured."""

    stalls_ms: list[float]  # the longest event-loop stall of each flush, in turn
    # The longest with no flush, the database as busy, as long as they took (if measured).
    control_ms: float | None
    new: list[Flush]  # each round's flush of the keys new
    again: list[Flush]  # and of the same keys again (every row updated)

    def medians(self, figure: Callable[[Flush], float]) -> tuple[float, float]:
        """A figure's median over the flushes of new keys, and over those of the keys again."""
        return statistics.median(map(figure, self.new)), statistics.median(map(figure, self.again))

    @property
    def stall_ms(self) -> float:
        return max(self.stalls_ms)

    def stalls(self) -> str:
        """The longest stall, each flush's (new keys, then again, round by round), and the
        control's."""
        each = ", ".join(f"{ms:.1f}" for ms in self.stalls_ms)
        return (
            f"longest event-loop stall {self.stall_ms:.1f} ms (each flush's: {each}; with no"
            f" flush, the database as busy for as long: {self.control_ms} ms)"
        )

    def rounds(self) -> str:
        """Each round's flushes, new keys and again."""
        return "\n".join(
            f"  round {number}: new {new}; again {again}"
            for number, (new, again) in enumerate(zip(self.new, self.again, strict=True), 1)
        )


def warm_memory(size: int) -> None:
    """Touches ``size`` bytes of memory and frees them, so that the pages the page cache takes
    next may be pages the machine holds: a virtual machine whose balloon reports free pages to
    its host hands them back, and the host backs each again only at its first touch."""
    region = mmap.mmap(-1, size)
    try:
        piece = bytes(1 << 20)
        for start in range(0, size, len(piece)):
            region[start : start + len(piece)] = piece[: size - start]
    finally:
        region.close()


def page_cache_bytes() -> int:
    """The kernel's cache of files: Cached and Buffers in /proc/meminfo, less Shmem, which
    Cached counts too (PostgreSQL's shared_buffers among it, as its pages are first touched)."""
    kib = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Cached", "Buffers", "Shmem"):
            kib[name] = int(value.split()[0])
    return (kib["Cached"] + kib["Buffers"] - kib["Shmem"]) << 10


async def stall_while_flushing(
    postgres: EmbeddedPostgres,
    spool: Path,
    keys: int,
    first_bucket: int,
    control: bool,
    rounds: int = ROUNDS,
    warm_bytes: int = 0,
) -> Flushes:
    """Flushes ``keys`` new keys, then the same keys again, as the server does, in ``rounds``
    rounds, each in a bucket of its own from ``first_bucket`` on, while a 1 ms ticker
    measures how late the event loop wakes; each just after :func:`warm_memory` of
    ``warm_bytes``, if any. Then, with ``control``, the ticker alone for as long as the flushes
    took, while PostgreSQL spins on as many connections: what the machine itself adds to the
    stall."""
    counters = Counters(max_keys=2 * keys)
    flusher = Flusher(
        counters, postgres.dsn, Metrics(), 1.0, Spool(spool, 1 << 30), 10, CONNECTIONS
    )
    await flusher.flush()  # connect and migrate first
    wal_reader = await asyncpg.connect(postgres.dsn)  # one connection for every WAL reading
    worst = 0.0  # of the flush in progress
    running = True
    # A tick across what precedes each flush (filling the counters, warm_memory(), reading
    # /proc) is not the flush's stall: the count moves on just before the flush starts.
    fills = 0
    stalls: list[float] = []

    async def ticker() -> None:
        # perf_counter, not loop.time(): uvloop's clock has millisecond steps.
        nonlocal worst
        while running:
            before, seen = time.perf_counter(), fills
            await asyncio.sleep(0.001)
            if seen == fills:
                worst = max(worst, time.perf_counter() - before - 0.001)

    async def timed_flush(bucket: int) -> Flush:
        nonlocal fills, worst
        fill(counters, keys, bucket)
        if warm_bytes:
            warm_memory(warm_bytes)
        wal = await wal_position(wal_reader)
        cache, cpu = page_cache_bytes(), database_cpu_time(postgres)
        fills += 1
        worst = 0.0
        started = time.perf_counter()
        await flusher.flush()
        seconds = time.perf_counter() - started
        stalls.append(round(worst * 1000, 1))
        cache, cpu = page_cache_bytes() - cache, database_cpu_time(postgres) - cpu
        return Flush(seconds, await wal_position(wal_reader) - wal, cache, cpu)

    probe = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    new: list[Flush] = []
    again: list[Flush] = []
    for round_number in range(rounds):
        bucket = first_bucket + 60 * round_number
        new.append(await timed_flush(bucket))
        again.append(await timed_flush(bucket))  # the same keys: every merge is an update
    control_ms = None
    if control:
        worst = 0.0
        await busy_database(postgres.dsn, sum(flush.seconds for flush in new + again))
        control_ms = round(worst * 1000, 1)
    running = False
    await probe
    await wal_reader.close()
    await flusher.close(5.0)
    return Flushes(stalls, control_ms, new, again)


async def wal_position(connection: asyncpg.Connection) -> int:
    """How many bytes of WAL the cluster has written in all."""
    return int(
        await connection.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
        )
    )


async def busy_database(dsn: str, seconds: float) -> None:
    """Keeps PostgreSQL's backends on CONNECTIONS connections spinning for ``seconds``."""
    spin = (
        "DO $$ BEGIN WHILE clock_timestamp() < now() + make_interval(secs => %s) LOOP"
        " END LOOP; END $$"
    )
    connections = [await asyncpg.connect(dsn) for _ in range(CONNECTIONS)]
    try:
        await asyncio.gather(*(c.execute(spin % float(seconds)) for c in connections))
    finally:
        for connection in connections:
            await connection.close()


async def phases(dsn: str, keys: int) -> tuple[float, float]:
    """(seconds to seal, seconds to apply over one connection) a window of ``keys`` new keys."""
    counters = Counters(max_keys=2 * keys)
    fill(counters, keys, bucket=BUCKET - 60)
    connection = await storage.connect(dsn, 10.0)
    try:
        started = time.perf_counter()
        batches: list[Batch] = []
        await seal(counters.swap(), batches.append, [0] * len(COLUMNS))
        sealed = time.perf_counter() - started
        started = time.perf_counter()
        for batch in batches:
            await storage.apply(connection, batch)
        applied = time.perf_counter() - started
    finally:
        await connection.close()
    return sealed, applied


def database_cpu_time(postgres: EmbeddedPostgres) -> CpuTime:
    """The CPU time PostgreSQL's processes have used: the postmaster's, its running children's,
    and its exited children's (autovacuum workers, say), which the postmaster collected."""
    postmaster = _postmaster(postgres)
    user = system = 0
    for pid in (postmaster, *_children(postmaster)):
        with contextlib.suppress(OSError):
            fields = stat_fields(f"/proc/{pid}/stat")
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
            if pid == postmaster:
                user += int(fields[13])  # cutime
                system += int(fields[14])  # cstime
    tick = os.sysconf("SC_CLK_TCK")
    return CpuTime(user / tick, system / tick)


@contextlib.contextmanager
def database_on_its_own_core(postgres: EmbeddedPostgres) -> Iterator[None]:
    """Pins PostgreSQL (the postmaster and its processes; backends inherit it) to the last core
    and this process to the others, as when the database runs on a machine of its own: the
    flusher's two connections otherwise keep every core of a small machine busy, and the
    event loop waits for the CPU, not for anything of its own."""
    cores = os.sched_getaffinity(0)
    postmaster = _postmaster(postgres)
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


def _postmaster(postgres: EmbeddedPostgres) -> int:
    return int((postgres.pgdata / "postmaster.pid").read_text().split()[0])


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat_fields(stat)[1]) == parent:
                found.append(int(stat.parent.name))
    return found


Part = Literal["stalls", "million"]


def measure(
    part: Part | None = None, rounds: int = ROUNDS, warm_bytes: int = 0
) -> dict[str, float]:
    """The figures; ``part`` "stalls" or "million" for those alone."""
    figures: dict[str, float] = {}
    if part is None:
        # Memory first, in a process that has not freed any heap yet to reuse.
        counters = Counters(max_keys=2_000_000)
        fill(counters, 1)
        before = resident_bytes()
        fill(counters, 1_000_000)
        figures["bytes_per_key"] = (resident_bytes() - before) / 1_000_000
        print(
            f"resident memory: {figures['bytes_per_key']:.0f} bytes per live key at 1,000,000 keys"
        )
        del counters
    with tempfile.TemporaryDirectory(prefix="pixel-bench-flush-") as name:
        folder = Path(name)
        postgres = EmbeddedPostgres(folder / "db")
        postgres.start()
        try:
            if part != "million":
                figures.update(stalls(postgres, folder))
            if part != "stalls":
                figures.update(a_million_keys(postgres, folder, rounds, warm_bytes))
        finally:
            postgres.stop()
    return figures


def stalls(postgres: EmbeddedPostgres, folder: Path) -> dict[str, float]:
    """The 200,000-key figures: the stalls with PostgreSQL on a core of its own and on every
    core, their controls, and the flushes' times."""
    with database_on_its_own_core(postgres):
        pinned = uvloop.run(
            stall_while_flushing(postgres, folder / "p", 200_000, BUCKET - 3600, True)
        )
    assert pinned.control_ms is not None
    print(f"200,000 keys, PostgreSQL on a core of its own: {pinned.stalls()}")
    shared = uvloop.run(stall_while_flushing(postgres, folder / "s", 200_000, BUCKET, True))
    assert shared.control_ms is not None
    new_s, again_s = shared.medians(lambda flush: flush.seconds)
    print(
        f"200,000 keys, PostgreSQL on every core: {shared.stalls()}; flushed in"
        f" {new_s:.2f} s, again in {again_s:.2f} s (medians)"
    )
    return {
        "stall_ms_200k_own_core": pinned.stall_ms,
        "control_stall_ms_own_core": pinned.control_ms,
        "stall_ms_200k": shared.stall_ms,
        "control_stall_ms": shared.control_ms,
        "flush_s_200k": new_s,
        "reflush_s_200k": again_s,
    }


def a_million_keys(
    postgres: EmbeddedPostgres, folder: Path, rounds: int, warm_bytes: int
) -> dict[str, float]:
    """The million-key figures: flushed new and again, and by phase."""
    million = uvloop.run(
        stall_while_flushing(
            postgres, folder / "m", 1_000_000, BUCKET + 3600, False, rounds, warm_bytes
        )
    )
    new_s, again_s = million.medians(lambda flush: flush.seconds)
    new_cpu_s, again_cpu_s = million.medians(lambda flush: flush.cpu.total)
    warmed = f", each after {warm_bytes >> 20} MiB of memory warmed" if warm_bytes else ""
    print(
        f"1,000,000 keys{warmed}: flushed (sealed, copied, merged) in {new_s:.2f} s;"
        f" the same keys again (every row updated) in {again_s:.2f} s"
        f" (medians of {rounds}), for which PostgreSQL used {new_cpu_s:.2f} s"
        f" and {again_cpu_s:.2f} s of CPU time on this machine's"
        f" {os.cpu_count()} cores; by round:\n{million.rounds()}"
    )
    sealed, applied = uvloop.run(phases(postgres.dsn, 1_000_000))
    print(
        f"1,000,000 new keys, by phase: sealed in {sealed:.2f} s,"
        f" applied over one connection in {applied:.2f} s"
    )
    return {
        "flush_s_1m": new_s,
        "reflush_s_1m": again_s,
        "flush_database_cpu_s_1m": new_cpu_s,
        "reflush_database_cpu_s_1m": again_cpu_s,
        "seal_s_1m": sealed,
        "apply_one_connection_s_1m": applied,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    part = parser.add_mutually_exclusive_group()
    part.add_argument(
        "--stalls-only",
        action="store_const",
        const="stalls",
        dest="part",
        help="only the 200,000-key stalls and controls",
    )
    part.add_argument(
        "--million-only",
        action="store_const",
        const="million",
        dest="part",
        help="only the million-key flushes",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=ROUNDS,
        help="million-key rounds (default %(default)s)",
    )
    parser.add_argument(
        "--warm-memory",
        type=positive_int,
        default=0,
        metavar="MIB",
        help="touch and free this many MiB of memory before each million-key flush, untimed",
    )
    args = parser.parse_args(argv)
    if args.part == "stalls" and (args.rounds != ROUNDS or args.warm_memory):
        parser.error(
            "--rounds and --warm-memory are for the million-key flushes, not --stalls-only"
        )
    figures = measure(args.part, args.rounds, args.warm_memory << 20)
    if args.json:
        args.json.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
