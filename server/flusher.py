"""The flusher: every ``--flush-interval`` it swaps the counters out, seals the window into
batches and merges the pending batches into PostgreSQL, over ``--flush-connections``
connections at once; each new batch is applied as soon as it is sealed, while the rest of the
window is still being encoded.

Every sealed batch is also written to the disk spool (fsynced) as it comes, while the database
applies it, and the file is removed once the batch is applied (:mod:`server.write_ahead`): a
hard kill or a power loss loses only the window still being counted. Counting never waits for
it: the swap is O(1), the counter engine sorts and encodes a window in a worker thread without
the GIL, and spool files are written and read in a thread. While the database is unreachable,
the spooled batches wait and are retried with capped exponential backoff and full jitter; a
batch PostgreSQL rejects for good is dead-lettered, so it never blocks the batches behind it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from _fastcount import Counters, Window
from server import storage
from server.batch import Batch, seal
from server.dsn import redact
from server.logs import describe
from server.metrics import Metrics
from server.spool import Spool
from server.write_ahead import Pending, WriteAhead

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 10.0
CONNECT_TIMEOUT = 5.0
# How often the ledger's old rows are pruned (by one server of those sharing the database).
PRUNING_INTERVAL = 3600.0
PRUNING_BUDGET = 1.0  # seconds a flush may spend pruning
# How often the BRIN indexes' new page ranges are summarized (by one server at a time).
SUMMARIZING_INTERVAL = 10.0
# A batch may have been applied (its commit's answer lost) this long before it was spooled.
SPOOLING_MARGIN = 3600.0
# Errors of a spool entry that is no file to read, and never will be.
_NOT_A_FILE = {errno.EISDIR, errno.ELOOP}

# Errors after which the batch stays pending and the connections are opened anew.
_RETRYABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# SQLSTATE classes that reject the batch's data: cardinality violations (a key twice in one
# merge), data exceptions (a value out of range), integrity constraint violations (a check an
# operator added), program limits exceeded (a key too long for the index). Any other error
# says nothing about the batch (a connection lost, a deadlock, a database made read-only or a
# privilege revoked, an internal error): the batch waits for the database to be mended.
_REJECTING_CLASSES = {"21", "22", "23", "54"}


def is_permanent(error: BaseException) -> bool:
    """True when the batch itself was rejected, by PostgreSQL or by the driver's encoding of
    its rows (a ``ValueError``): retrying cannot help."""
    if isinstance(error, asyncpg.PostgresError):
        return (error.sqlstate or "")[:2] in _REJECTING_CLASSES
    return isinstance(error, ValueError)


class Flusher:
    def __init__(
        self,
        counters: Counters,
        dsn: str,
        metrics: Metrics,
        interval: float,
        spool: Spool,
        max_in_memory: int,
        connections: int,
        *,
        ledger_seconds: float = 30 * 86400.0,
    ) -> None:
        """``max_in_memory`` caps the batches held in memory while the spool cannot take them
        (over budget, disk failing); beyond it the oldest is dropped, counted and logged.
        ``connections`` batches are merged at once, each over a connection of its own. The
        ledger keeps an applied batch's id ``ledger_seconds``: a spooled batch written before
        the rows it has pruned is dead-lettered, for it may have been applied already."""
        self._counters = counters
        self._max_in_memory = max_in_memory
        self._dsn = dsn
        self._metrics = metrics
        self._interval = interval
        self._spool = spool
        self._pending = collections.deque(Pending(None, path) for path in spool.adopt())
        self._connections: list[Any] = []
        self._unsealed: collections.deque[Window] = collections.deque()  # left by failed seals
        self._connection_count = connections
        self._ledger_seconds = ledger_seconds
        self._prune_at = 0.0  # loop time of the next pruning
        self._summarize_at = 0.0  # and of the next summarizing
        self._warned_not_owned = False
        self._failures = 0
        self._retry_at = 0.0
        self._stopping = asyncio.Event()
        self._sealing = asyncio.Lock()
        self._write_ahead = WriteAhead(spool)
        self._unreadable: set[Path] = set()  # spool files whose read failed, logged once
        self.problem = "not connected to the database yet"
        if self._pending:
            log.info("%d spooled batches found in %s", len(self._pending), spool.directory)

    @property
    def ready(self) -> bool:
        """True while the database takes every batch and the spool is within its budget."""
        return bool(self._connections) and self._failures == 0 and not self._spool.over_budget

    @property
    def pending_batches(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Flushes at once (connecting and migrating), then every interval, until stopped.

        A flush that outlasts the interval (a database that hangs, its connections open, makes
        each statement wait up to storage.COMMAND_TIMEOUT) does not keep the counts in memory
        meanwhile: at every interval the window is sealed and spooled, so a hard kill loses at
        most one interval's counts (and those of a seal under way, which a machine whose every
        core is busy slows: the engine sorts and encodes at a low priority)."""
        while not self._stopping.is_set():
            flushing = asyncio.ensure_future(self._flush_reporting_errors())
            try:
                while not (await asyncio.wait({flushing}, timeout=self._interval))[0]:
                    await self._spool_ahead()
            except asyncio.CancelledError:
                flushing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flushing
                raise
            flushing.result()  # raises what a flush could not report itself
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def _flush_reporting_errors(self) -> None:
        try:
            await self.flush()
        except Exception:
            # A bug, most likely: reported, and the next flush tries again, for a flusher that
            # stopped would leave every count from then on in memory only.
            log.exception("the flush failed; the next one tries again")

    async def _spool_ahead(self) -> None:
        """Every interval a flush outlasts: seals the window, which spools its batches, so
        that no more than an interval's counts are only in memory however long the flush
        takes. Not while a write to the spool has taken longer than an interval (a disk
        that hangs): the window, capped by ``--max-keys``, holds the counts meanwhile, where
        sealed batches would only pile up in memory."""
        if self._write_ahead.hung(self._interval):
            return
        try:
            await self._seal()
        except Exception:
            log.exception("spooling ahead of a flush under way failed")

    def stop(self) -> None:
        """Asks :meth:`run` to return after the flush in progress, if any."""
        self._stopping.set()

    async def finish(self, running: asyncio.Task[None], seconds: float) -> None:
        """Stops :meth:`run`, the task ``running``, giving the flush in progress ``seconds``.
        Past them its connections are dropped, so it ends at once, its batches pending."""
        self.stop()
        try:
            finished = await self._within(running, seconds)
        except Exception:
            log.exception("the flusher stopped on an error; the final flush goes on")
            return
        if not finished:
            log.warning(
                "shutdown: the flush in progress did not finish within %.1f s; its connections"
                " were dropped",
                seconds,
            )

    async def flush(self) -> None:
        """Seals and spools the current window and, unless in backoff, applies what is pending
        meanwhile, each new batch as soon as it is sealed; then, if the database failed,
        tries the spool again for what it could not take at the seal, and caps the rest."""
        await self._spool.refresh()
        if asyncio.get_running_loop().time() >= self._retry_at:
            await self._seal_and_apply(CONNECT_TIMEOUT)
        else:
            await self._seal()
        if self._failures:
            await self._spool_in_memory()

    async def close(self, timeout: float) -> None:
        """The final flush: one try at the database within half of ``timeout``, then whatever
        is still in memory goes to the spool, for the next start to apply."""
        await self._seal()
        unsealed = sum(len(window) for window in self._unsealed)
        if unsealed:
            self._metrics.dropped += unsealed
            log.error("shutdown: %d rows could not be sealed; dropped", unsealed)
        arrivals = self._queued()
        self._end(arrivals)
        failures = self._failures
        applied = await self._within(
            self._apply_pending(min(CONNECT_TIMEOUT, timeout / 4), arrivals, maintaining=False),
            timeout / 2,
        )
        if not applied:
            log.warning(
                "shutdown: the database did not take the batches within %.1f s; they go to"
                " the spool",
                timeout / 2,
            )
            if self._failures == failures:
                self._failed(TimeoutError("no answer within half the shutdown timeout"))
        await self._spool.refresh()
        if any(item.path is None for item in self._pending):
            await self._spool_in_memory()
        lost = [item for item in self._pending if item.path is None]
        if lost:
            for item in lost:
                self._pending.remove(item)
            self._drop(lost, "at shutdown")
        if self._pending:
            log.warning(
                "shutdown: %d batches wait in the spool %s for the next start",
                len(self._pending),
                self._spool.directory,
            )
        connections, self._connections = self._connections, []
        for connection in connections:
            try:
                await connection.close(timeout=CONNECT_TIMEOUT)
            except _RETRYABLE:
                connection.terminate()
        # What the writer has left is applied, spooled or dropped by now: it ends at once, but
        # for a write under way, which is given a connect timeout.
        if await self._write_ahead.close(CONNECT_TIMEOUT):
            self._spool.close()
        # Else a write is under way on a disk that hangs: this process keeps its files until
        # it exits, when the next to start adopts them (and removes the write's part).

    async def _within(self, work: Awaitable[None], seconds: float) -> bool:
        """Awaits ``work`` for up to ``seconds``; False if it took longer. Then the connections
        are dropped, so that what it waits for from the database fails at once and it ends on
        its own, keeping its batches pending, rather than being cancelled mid-statement (it
        is cancelled only if it still has not ended a connect timeout later)."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=seconds)
            if done:
                if not task.cancelled():
                    task.result()  # raises what it raised
                return True
            self._disconnect()
            done, _ = await asyncio.wait({task}, timeout=CONNECT_TIMEOUT)
            if not done:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def _seal_and_apply(self, connect_timeout: float) -> None:
        arrivals = self._queued()
        sealing = asyncio.create_task(self._seal(arrivals.put_nowait))
        sealing.add_done_callback(lambda _: self._end(arrivals))
        try:
            await self._apply_pending(connect_timeout, arrivals)
        finally:
            await sealing  # so every sealed batch is pending when the flush goes on

    def _queued(self) -> asyncio.Queue[Pending | None]:
        """The pending batches, oldest first, for the connections to take one at a time."""
        arrivals: asyncio.Queue[Pending | None] = asyncio.Queue()
        for item in self._pending:
            arrivals.put_nowait(item)
        return arrivals

    def _end(self, arrivals: asyncio.Queue[Pending | None]) -> None:
        """Tells every connection that no batch follows the ones queued."""
        for _ in range(self._connection_count):
            arrivals.put_nowait(None)

    async def _seal(self, arrived: Callable[[Pending], object] = lambda item: None) -> None:
        """Seals the current window, and any a failed seal left, into pending batches,
        passing each to ``arrived`` as well, and to the spool's writer, which writes it to
        disk while the database may be applying it, so that a hard kill or a power loss
        spares it. One seal at a time: a second waits for the first, which may be sealing
        the windows it would find."""

        def add(item: Pending) -> None:
            arrived(item)
            self._write_ahead.put(item)

        async with self._sealing:
            await self._seal_windows(add)

    async def _seal_windows(self, arrived: Callable[[Pending], object]) -> None:

        def add(batch: Batch) -> None:
            item = Pending(batch)
            self._pending.append(item)
            arrived(item)

        window = self._counters.swap()
        if window.overflowed:
            self._metrics.overflowed += window.overflowed
            log.warning(
                "key cap of %d reached: %d increments counted in the __overflow__ row",
                self._counters.max_keys,
                window.overflowed,
            )
        if len(window):
            self._unsealed.append(window)
        while self._unsealed:
            window = self._unsealed[0]
            try:
                await seal(window, add, self._metrics.events)
            except Exception:
                # Out of memory, say: the rows not sealed yet wait in the window for the next
                # flush, and the flusher goes on.
                log.exception("sealing failed; %d rows wait for the next flush", len(window))
                return
            finally:
                if not len(window):
                    self._unsealed.popleft()

    async def _apply_pending(
        self,
        connect_timeout: float,
        arrivals: asyncio.Queue[Pending | None],
        maintaining: bool = True,
    ) -> None:
        """Applies the pending batches and those arriving; then, unless told not to (at
        shutdown), prunes the ledger and summarizes the BRIN indexes, each when due."""
        try:
            if len(self._connections) < self._connection_count:
                while len(self._connections) < self._connection_count:
                    # The first connection of a set brings the schema up to date.
                    connection = await storage.connect(
                        self._dsn, connect_timeout, migrating=not self._connections
                    )
                    self._connections.append(connection)
                log.info("connected to %s", redact(self._dsn))
            # Each connection takes the oldest batch no other has taken, until none follows;
            # one that fails stops, and the others finish what is left.
            errors = [
                error
                for error in await asyncio.gather(
                    *(self._apply_each(connection, arrivals) for connection in self._connections),
                    return_exceptions=True,
                )
                if error is not None
            ]
            if errors:
                raise errors[0]
        except asyncio.CancelledError:
            # A statement cut short can leave the driver wrong about its connection: a BEGIN
            # cancelled in flight leaves it taking every later transaction for a savepoint
            # of one that is never committed. So the connections go, and the batches that
            # were being applied stay pending for the next try on fresh ones (the ledger
            # skips any that did commit).
            self._disconnect()
            raise
        except (*_RETRYABLE, storage.MigrationError) as error:
            self._failed(error)
            return
        except Exception as error:
            # Anything else (a driver state left behind by an operation cut short, say) is a
            # bug to report, not a reason to stop flushing: the batch stays pending and the
            # connections are opened anew, as after any failure.
            log.exception("unexpected error while writing to %s", redact(self._dsn))
            self._failed(error)
            return
        if self._failures:
            log.info("database %s is back; all waiting batches applied", redact(self._dsn))
        self._failures = 0
        self._retry_at = 0.0
        self.problem = ""
        # Not once shutting down: the final flush's time is the batches'. (A shutdown's timeout
        # may have dropped the connections already.)
        if maintaining and self._connections and not self._stopping.is_set():
            try:
                await self._maintain(self._connections[0])
            except asyncio.CancelledError:
                self._disconnect()  # a statement cut short: as in the apply, above
                raise

    async def _maintain(self, connection: Any) -> None:
        """Prunes the ledger and summarizes the BRIN indexes on ``connection``, each when due."""
        if asyncio.get_running_loop().time() >= self._prune_at:
            await self._prune_ledger(connection)
        if self._connections and asyncio.get_running_loop().time() >= self._summarize_at:
            await self._summarize_ranges(connection)

    async def _prune_ledger(self, connection: Any) -> None:
        """Prunes the ledger for a second at most, so the flushes hardly wait: again in an
        hour, or in a minute while old rows are left (a ledger never pruned before)."""
        loop = asyncio.get_running_loop()
        self._prune_at = loop.time() + PRUNING_INTERVAL
        # Never past a file in the spool (another worker's, say, from a long outage), whose
        # batch the ledger may hold, applied up to a margin before it was spooled; and a
        # second margin to spare, so the file is never taken for one spooled before the
        # horizon.
        paths = await asyncio.to_thread(self._spool.paths)
        oldest = min((_spooled_at(path) for path in paths), default=time.time())
        try:
            pruned, done = await storage.prune_ledger(
                connection,
                self._ledger_seconds,
                PRUNING_BUDGET,
                oldest - 2 * SPOOLING_MARGIN,
            )
        except Exception as error:
            self._maintenance_failed("prune the ledger", error, "an hour", connection)
            return
        if not done:
            self._prune_at = loop.time() + PRUNING_INTERVAL / 60
        if pruned:
            log.info(
                "pruned %d ledger rows older than %.0f days", pruned, self._ledger_seconds / 86400
            )

    async def _summarize_ranges(self, connection: Any) -> None:
        """Summarizes the BRIN indexes' new page ranges: again in SUMMARIZING_INTERVAL. Says
        once if some are another role's, which the flusher cannot summarize."""
        loop = asyncio.get_running_loop()
        self._summarize_at = loop.time() + SUMMARIZING_INTERVAL
        started = loop.time()
        try:
            summarized = await storage.summarize_ranges(connection)
        except Exception as error:
            self._maintenance_failed(
                "summarize the BRIN indexes", error, f"{SUMMARIZING_INTERVAL:.0f} s", connection
            )
            return
        if summarized is None:
            log.debug("BRIN summarizing skipped: another server is at it, or the table is locked")
            return
        log.debug(
            "summarized %d BRIN page ranges in %.0f ms",
            summarized.ranges,
            (loop.time() - started) * 1000,
        )
        if summarized.not_owned and not self._warned_not_owned:
            self._warned_not_owned = True
            log.warning(
                "%d BRIN indexes on pixel_counts belong to another role, which must summarize"
                ' their new page ranges (or a vacuum will): README, "Summaries of new page'
                ' ranges"',
                summarized.not_owned,
            )

    def _maintenance_failed(self, task: str, error: Exception, retry: str, connection: Any) -> None:
        """Says that pruning or summarizing failed (with its traceback, if not the database's
        or the connection's error: a bug). Unless the database answered and the connection
        is still open, drops the connections, which the next flush opens anew (its batches
        all applied, it counts no failure); until then the flusher is not ready, and says
        why."""
        if isinstance(error, _RETRYABLE):
            log.warning("cannot %s: %s; next try in %s", task, describe(error), retry)
        else:
            log.exception("cannot %s; next try in %s", task, retry)
        if not isinstance(error, asyncpg.PostgresError) or connection.is_closed():
            self._disconnect()
            self.problem = f"reconnecting: could not {task}: {describe(error)}"

    async def _apply_each(self, connection: Any, arrivals: asyncio.Queue[Pending | None]) -> None:
        while (item := await arrivals.get()) is not None:
            if await self._apply(connection, item):
                self._pending.remove(item)
                item.batch = None

    async def _apply(self, connection: Any, item: Pending) -> bool:
        """Applies one pending batch, or dead-letters it; raises what is worth a retry.
        False if the batch stays pending: its spool file could not be read this time."""
        batch, spooled = item.batch, None
        if batch is None:
            assert item.path is not None
            try:
                batch = await asyncio.to_thread(self._spool.read, item.path)
            except FileNotFoundError as error:
                if os.path.lexists(item.path):  # a symbolic link to nothing
                    await self._quarantine(item.path, error)
                return True  # or removed by an operator meanwhile
            except ValueError as error:  # not a batch file
                await self._quarantine(item.path, error)
                return True
            except OSError as error:
                if error.errno in _NOT_A_FILE:  # and never will be
                    await self._quarantine(item.path, error)
                    return True
                # Out of file descriptors, say: the spool's trouble, and maybe passing. It is
                # tried at every flush, and said once.
                if item.path not in self._unreadable:
                    self._unreadable.add(item.path)
                    log.error(
                        "cannot read spool file %s: %s; it waits, tried again at every flush",
                        item.path,
                        describe(error),
                    )
                return False
            self._unreadable.discard(item.path)
            # Read back: maybe spooled long ago, before the ledger's pruned rows.
            spooled = _spooled_at(item.path)
        started = time.perf_counter()
        try:
            applied = await storage.apply(
                connection, batch, None if spooled is None else spooled - SPOOLING_MARGIN
            )
        except storage.PastLedgerHorizon:
            assert spooled is not None
            why = (
                f"spooled {(time.time() - spooled) / 86400:.0f} days ago, before the ledger's"
                " pruned rows (--ledger-days): it may have been applied; move it back into the"
                " spool to apply it all the same"
            )
            return await self._dead_letter(item, batch, why)
        except (asyncpg.PostgresError, ValueError) as error:
            if not is_permanent(error):
                raise
            return await self._dead_letter(
                item, batch, f"PostgreSQL rejected it: {describe(error)}"
            )
        seconds = time.perf_counter() - started
        await self._write_ahead.settle(item)
        if applied:
            self._metrics.flushed(batch.rows, seconds)
        else:
            log.warning("batch %s was already applied; skipped", batch.batch_id)
        return True

    async def _dead_letter(self, item: Pending, batch: Batch, why: str) -> bool:
        """Sets a batch aside, with why, and then removes its spool file, which may have been
        written meanwhile (or, once it is, its writer does). False if the dead letter cannot
        be written (a full disk, say): the spool's trouble, not the database's, and the batch
        waits for the next flush."""
        try:
            target = await asyncio.to_thread(self._spool.dead_letter, batch, why)
        except OSError as error:
            trouble = f"cannot take a dead letter ({error.strerror})"
            self._write_ahead.refuses(logging.ERROR, trouble)
            return False
        await self._write_ahead.settle(item)
        self._metrics.dead_lettered += 1
        log.error(
            "batch %s (%d rows) dead-lettered to %s: %s", batch.batch_id, batch.rows, target, why
        )
        return True

    async def _quarantine(self, path: Path, error: Exception) -> None:
        """Moves a spool file that holds no batch, or cannot be read, to the dead letters.
        The spool's own trouble: the database is not to blame, and the others go on."""
        try:
            target = await asyncio.to_thread(self._spool.quarantine, path)
        except FileNotFoundError:
            return  # moved by another process sharing the spool
        except OSError as move_error:
            log.error(
                "spool file %s is unreadable (%s) and cannot be moved (%s); the next start"
                " tries it again",
                path,
                describe(error),
                move_error,
            )
            return
        self._metrics.dead_lettered += 1
        log.error("spool file %s is unreadable (%s); moved to %s", path, describe(error), target)

    async def _spool_in_memory(self) -> None:
        """Writes the batches held only in memory to the spool, while it has room, and lets
        go of those on disk (they are read back when applied); then drops the oldest beyond
        ``max_in_memory`` (never while a flush may be applying them)."""
        async with self._write_ahead.lock:
            # A copy: a flush may remove some meanwhile.
            await self._write_ahead.write(list(self._pending))
            for item in self._pending:
                if item.path is not None:
                    item.batch = None
            in_memory = [item for item in self._pending if item.path is None]
            if len(in_memory) > self._max_in_memory:
                oldest = in_memory[: len(in_memory) - self._max_in_memory]
                for item in oldest:
                    self._pending.remove(item)
                self._drop(oldest, "memory cap reached")

    def _drop(self, items: list[Pending], why: str) -> None:
        """Counts and logs batches no longer pending, that were held in memory only; their
        writes ahead, if still queued, are not made."""
        batches = [item.batch for item in items if item.batch is not None]
        for item in items:
            item.settled = True
        rows = sum(batch.rows for batch in batches)
        self._metrics.dropped += rows
        log.error(
            "%s: %d batches (%d rows) could neither be written to %s nor spooled; dropped",
            why,
            len(batches),
            rows,
            redact(self._dsn),
        )

    def _disconnect(self) -> None:
        """Drops the connections at once; the next apply opens new ones."""
        connections, self._connections = self._connections, []
        for connection in connections:
            connection.terminate()

    def _failed(self, error: BaseException) -> None:
        self._metrics.flush_failures += 1
        self._failures += 1
        self._disconnect()
        delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**self._failures))
        self._retry_at = asyncio.get_running_loop().time() + delay
        dsn = redact(self._dsn)
        migration = isinstance(error, storage.MigrationError)
        self.problem = (
            f"database {dsn}: {error}" if migration else f"database {dsn} unreachable: {error}"
        )
        message = (
            "cannot write to database %s: %s: %s; %d batches waiting (%d in the spool),"
            " retry %d in %.1fs"
        )
        args = (
            dsn,
            type(error).__name__,
            error,
            len(self._pending),
            self._spool.batches,
            self._failures,
            delay,
        )
        # The first failure of an outage is a warning, of a migration an error, for it needs
        # the operator; the retries are quieter.
        first = log.error if migration else log.warning
        (first if self._failures == 1 else log.info)(message, *args)


def _spooled_at(path: Path) -> float:
    """When a spool file was written, in unix seconds, by the nanoseconds its name starts
    with; now for a name that holds none."""
    written, _, _ = path.name.partition("-")
    return int(written) / 1e9 if written.isdigit() else time.time()
