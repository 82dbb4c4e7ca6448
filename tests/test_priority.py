"""The flusher's helper threads, which seal windows and write the spool, run at the event
loop's own priority: a thread of the least priority that holds the GIL, or that the loop must
hand it to, may not run again for tens of milliseconds on a busy core, while the loop waits
(README: "the rare stalls were the GIL"). The counter engine's long GIL-free work (sorting a
window, encoding its rows) runs on a thread of its own at a low priority, nice 10, which never
takes the GIL: on a core it shares with the loop, the loop runs first."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import _fastcount
from _fastcount import IMPRESSIONS, Counters, Window
from loadtests.processes import stat_fields
from server import batch as batch_module
from server.batch import Batch, seal_window
from server.flusher import Flusher
from server.metrics import Metrics
from server.spool import Spool
from tests.harness import totals_by_key


def nice() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_a_flush_seals_and_spools_at_the_event_loops_priority(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if nice() == 19:
        pytest.skip("run at nice 19: a helper at the least priority would look like the loop")
    seen: dict[str, int] = {}
    real_seal = batch_module.seal_window
    real_write = Spool.write

    def noted_seal(window: Window, add: Callable[[Batch], object]) -> tuple[int, ...]:
        seen["sealing"] = nice()
        return real_seal(window, add)

    def noted_write(spool: Spool, batch: Batch) -> Path:
        seen["spooling"] = nice()
        return real_write(spool, batch)

    monkeypatch.setattr(batch_module, "seal_window", noted_seal)
    monkeypatch.setattr(Spool, "write", noted_write)
    counters = Counters()
    flusher = Flusher(counters, database, Metrics(), 1.0, Spool(tmp_path, 1 << 20), 10, 2)
    counters.add(60, "campaign", "", "", "", IMPRESSIONS, 5)
    await flusher.flush()
    await flusher.close(5.0)
    loop = nice()
    assert seen == {"sealing": loop, "spooling": loop}
    assert await totals_by_key(database) == {("campaign", "", "", ""): (5, 0, 0, 0, 0, 0)}


def engine_threads() -> dict[int, int]:
    """The counter engine's threads of this process now, each with its nice value (a thread
    may end between the listing and the reads)."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        try:
            comm = Path(f"/proc/self/task/{task}/comm").read_text().strip()
            fields = stat_fields(f"/proc/self/task/{task}/stat")
        except OSError:
            continue
        if comm == "fastcount-low":
            found[int(task)] = int(fields[16])  # nice: field 19 of proc(5)
    return found


@pytest.mark.skipif(
    _fastcount.Window.__module__ != "_fastcount._counters_c"
    or sys.platform != "linux"
    or nice() > 10,  # a thread cannot raise its priority back to nice 10
    reason="the compiled engine on Linux has a thread of low priority, below the caller's",
)
def test_the_engines_gil_free_work_runs_at_a_low_priority() -> None:
    counters = Counters()
    for key in range(300_000):
        counters.add(60, f"campaign-{key}", "", "", "", IMPRESSIONS)
    window = counters.swap()
    batches: list[Batch] = []
    sealing = threading.Thread(target=seal_window, args=(window, batches.append))
    seen: dict[int, int] = {}
    sealing.start()
    while sealing.is_alive():  # the sort alone takes tens of milliseconds
        seen.update(engine_threads())
        time.sleep(0.001)  # a busy sampler would take the CPU the engine's thread waits for
    sealing.join()
    assert seen and set(seen.values()) == {10}
    deadline = time.monotonic() + 10  # each ends with its work (and leaves /proc soon after)
    while engine_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine_threads() == {}
    assert sum(batch.rows for batch in batches) == 300_000
