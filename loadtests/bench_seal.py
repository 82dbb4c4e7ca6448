"""Sealing on a busy machine: a window of a million keys sealed alone, then with every core busy.

    python -m loadtests.bench_seal [--keys 1000000] [--rounds 3]

The counter engine sorts and encodes a window on a thread of low priority (nice 10), so that
the event loop runs first on a core they share. The cost is the sealing's own time when
threads of the same session or cgroup (a saturated event loop, the other workers) keep every
core busy: nice values weigh threads against each other there. This prints the median time to
seal the window (as the flusher's sealing thread does: sort, then encode batches of
100,000 rows), alone and with a busy-looping process per core started from this one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _fastcount import Counters
from loadtests.bench_flush import BUCKET, fill
from server.batch import Batch, seal_window
from server.config import positive_int

BUSY = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"


def seconds_to_seal(keys: int) -> float:
    """Fills a window of ``keys`` keys, then times its sealing (which waits for the engine's
    thread, as the flusher's sealing thread does)."""
    counters = Counters(max_keys=2 * keys)
    fill(counters, keys, BUCKET)
    window = counters.swap()
    batches: list[Batch] = []
    started = time.perf_counter()
    seal_window(window, batches.append)
    seconds = time.perf_counter() - started
    if sum(batch.rows for batch in batches) != keys:
        raise RuntimeError("the sealing lost rows")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=positive_int, default=1_000_000)
    parser.add_argument("--rounds", type=positive_int, default=3)
    args = parser.parse_args(argv)
    alone = [seconds_to_seal(args.keys) for _ in range(args.rounds)]
    cores = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        contended = [seconds_to_seal(args.keys) for _ in range(args.rounds)]
    finally:
        for process in busy:
            process.kill()
            process.wait()
    print(
        f"{args.keys:,} keys sealed in {statistics.median(alone):.2f} s alone, in"
        f" {statistics.median(contended):.2f} s with a busy process on each of {cores} cores"
        f" (medians of {args.rounds})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
