"""The flusher's helper threads, which seal windows and write the spool, run at the event
loop's own priority: a thread of the least priority that holds the GIL, or that the loop must
hand it to, may not run again for tens of milliseconds on a busy core, while the loop waits
(README: "the rare stalls were the GIL")."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from _fastcount import IMPRESSIONS, Counters, Window
from server import batch as batch_module
from server.batch import Batch
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
    seal_window = batch_module.seal_window
    write = Spool.write

    def noted_seal(window: Window, add: Callable[[Batch], object]) -> tuple[int, ...]:
        seen["sealing"] = nice()
        return seal_window(window, add)

    def noted_write(spool: Spool, batch: Batch) -> Path:
        seen["spooling"] = nice()
        return write(spool, batch)

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
