"""Writing ahead: every sealed batch goes to the disk spool as it is sealed, while the database
applies it from memory, so that a hard kill or a power loss spares it; its file is removed once
the batch is settled (applied, or set aside), whichever of the two ends first.

The batches are written by a task of their own and one thread, so that a slow disk holds up no
seal and no flush. The spool's trouble (over its budget, a disk refusing writes) is logged once
for as long as it lasts, with a line when it passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
from pathlib import Path

from server.batch import Batch
from server.spool import Spool

log = logging.getLogger(__name__)

# Spool files are written by one thread, at the event loop's priority, as the sealing is (see
# server.batch.seal): copying a big batch into the page cache takes milliseconds.
_SPOOL_WRITER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")


@dataclasses.dataclass
class Pending:
    """A sealed batch waiting for the database: in memory, on disk, or both."""

    batch: Batch | None
    path: Path | None = None
    settled: bool = False  # applied, or set aside: its file, once written, is not needed
    writing: bool = False  # its file is being written


class WriteAhead:
    """The spool's writer for one flusher."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.lock = asyncio.Lock()  # one writer of the batches in memory at a time
        self._queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._since: float | None = None  # loop time the write under way began
        self._trouble = ""  # why the spool takes no batches, logged once per episode

    def put(self, item: Pending) -> None:
        """Queues a sealed batch to be written, keeping it in memory for the flush applying
        it."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        self._queue.put_nowait(item)

    def hung(self, seconds: float) -> bool:
        """Whether the write under way, if any, has taken longer than ``seconds``."""
        loop = asyncio.get_running_loop()
        return self._since is not None and loop.time() - self._since > seconds

    async def close(self, timeout: float) -> bool:
        """Writes what is queued and ends, giving a write under way ``timeout`` seconds;
        False if one was still under way then (in its thread, which cannot be stopped)."""
        if self._task is not None:
            self._queue.put_nowait(None)
            if not (await asyncio.wait({self._task}, timeout=timeout))[0]:
                self._task.cancel()
        return self._since is None

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            try:
                async with self.lock:
                    await self.write([item])
            except Exception:
                log.exception("writing a batch to the spool failed; it stays in memory")

    async def write(self, items: list[Pending]) -> None:
        """Writes the batches held only in memory, while the spool takes them; the caller
        holds :attr:`lock`."""
        for item in items:
            if item.path is not None or item.batch is None or item.settled or item.writing:
                continue
            if self._spool.over_budget:
                budget = self._spool.max_bytes
                self.refuses(logging.WARNING, f"is over its budget of {budget} bytes")
                break
            loop = asyncio.get_running_loop()
            item.writing, self._since = True, loop.time()
            writing = loop.run_in_executor(_SPOOL_WRITER, self._spool.write, item.batch)
            try:
                # Shielded: a cancel cannot stop the thread, and the file must be known.
                item.path = await asyncio.shield(writing)
                item.writing, self._since = False, None
            except OSError as error:
                item.writing, self._since = False, None
                self.refuses(logging.ERROR, f"cannot be written ({error.strerror or error})")
                break
            except asyncio.CancelledError:
                writing.add_done_callback(functools.partial(self._written_late, item))
                raise
            if self._trouble:
                log.info("spool %s takes batches again", self._spool.directory)
                self._trouble = ""
            if item.settled:  # applied, or set aside, meanwhile
                await asyncio.to_thread(self._remove_settled, item.path)

    def _written_late(self, item: Pending, writing: asyncio.Future[Path]) -> None:
        """Records the file of a write whose writer was cancelled, and removes it (on the
        event loop: one unlink, and rare) if its batch is settled meanwhile, so that no file
        of a settled batch is left behind."""
        item.writing, self._since = False, None
        if writing.cancelled() or writing.exception() is not None:
            return
        item.path = writing.result()
        if item.settled:
            self._remove_settled(item.path)

    async def settle(self, item: Pending) -> None:
        """Marks a batch applied, or set aside, and removes its spool file. A file still being
        written is removed by its writer, which sees the mark."""
        item.settled = True
        if item.path is not None:
            await asyncio.to_thread(self._remove_settled, item.path)

    def _remove_settled(self, path: Path) -> None:
        try:
            self._spool.remove(path)
        except OSError as error:
            log.error(
                "cannot remove %s, whose batch is applied or set aside: %s; the ledger skips it"
                " at the next start",
                path,
                error,
            )

    def refuses(self, level: int, trouble: str) -> None:
        """Logs why the spool takes no batches, once for as long as the reason stays."""
        if trouble != self._trouble:
            log.log(level, "spool %s %s; batches wait in memory", self._spool.directory, trouble)
            self._trouble = trouble
