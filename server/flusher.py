"""The flusher: every ``--flush-interval`` it swaps the counters out, seals the window into a
batch and merges the pending batches into PostgreSQL, oldest first.

Counting never waits for it: the swap is O(1), sealing yields to the event loop between chunks,
and while the database is unreachable the batches wait in order and are retried with capped
exponential backoff and full jitter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from typing import Any

import asyncpg

from _fastcount import Counters
from server import storage
from server.batch import Batch, seal
from server.dsn import redact
from server.metrics import Metrics

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 10.0
CONNECT_TIMEOUT = 5.0

# Errors after which the batch stays pending and the connection is opened anew.
_RETRYABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Flusher:
    def __init__(self, counters: Counters, dsn: str, metrics: Metrics, interval: float) -> None:
        self._counters = counters
        self._dsn = dsn
        self._metrics = metrics
        self._interval = interval
        self._pending: collections.deque[Batch] = collections.deque()
        self._connection: Any = None
        self._failures = 0
        self._retry_at = 0.0
        self._stopping = asyncio.Event()
        self.problem = "not connected to the database yet"

    @property
    def ready(self) -> bool:
        """True while the database is reachable and no batch is waiting for it."""
        return self._connection is not None and self._failures == 0

    @property
    def pending_rows(self) -> int:
        return sum(len(batch.rows) for batch in self._pending)

    async def run(self) -> None:
        """Flushes at once (connecting and migrating), then every interval, until stopped."""
        while not self._stopping.is_set():
            await self.flush()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    def stop(self) -> None:
        """Asks :meth:`run` to return after the flush in progress, if any."""
        self._stopping.set()

    async def flush(self) -> None:
        """Seals the current window, then applies what is pending unless in backoff."""
        await self._seal()
        if asyncio.get_running_loop().time() >= self._retry_at:
            await self._apply_pending(CONNECT_TIMEOUT)

    async def close(self, timeout: float) -> None:
        """The final flush: seals the last window and retries until ``timeout`` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._seal()
        while self._pending and (left := deadline - loop.time()) > 0:
            await self._apply_pending(min(CONNECT_TIMEOUT, left))
            if self._pending:
                await asyncio.sleep(min(self._retry_at, deadline) - loop.time())
        if self._pending:
            lost = self.pending_rows
            self._metrics.dropped += lost
            log.error(
                "shutdown: %d batches (%d rows) could not be written to %s before the"
                " shutdown timeout of %gs; their counts are lost",
                len(self._pending),
                lost,
                redact(self._dsn),
                timeout,
            )
            self._pending.clear()
        if self._connection is not None:
            try:
                await self._connection.close(timeout=CONNECT_TIMEOUT)
            except _RETRYABLE:
                self._connection.terminate()
            self._connection = None

    async def _seal(self) -> None:
        window = self._counters.swap()
        if window.overflowed:
            self._metrics.overflowed += window.overflowed
            log.warning(
                "key cap of %d reached: %d increments counted in the __overflow__ row",
                self._counters.max_keys,
                window.overflowed,
            )
        if len(window):
            self._pending.append(await seal(window))

    async def _apply_pending(self, connect_timeout: float) -> None:
        try:
            if self._connection is None:
                self._connection = await storage.connect(self._dsn, connect_timeout)
                log.info("connected to %s", redact(self._dsn))
            while self._pending:
                batch = self._pending[0]
                applied = await storage.apply(self._connection, batch)
                self._pending.popleft()
                if applied:
                    self._metrics.flushes += 1
                    self._metrics.flushed_rows += len(batch.rows)
                else:
                    log.warning("batch %s was already applied; skipped", batch.batch_id)
        except _RETRYABLE as error:
            self._failed(error)
            return
        if self._failures:
            log.info("database %s is back; all waiting batches applied", redact(self._dsn))
        self._failures = 0
        self._retry_at = 0.0
        self.problem = ""

    def _failed(self, error: BaseException) -> None:
        self._metrics.flush_failures += 1
        self._failures += 1
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None
        delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**self._failures))
        self._retry_at = asyncio.get_running_loop().time() + delay
        self.problem = f"database {redact(self._dsn)} unreachable: {error}"
        message = (
            "cannot write to database %s: %s: %s; %d batches (%d rows) waiting, retry %d in %.1fs"
        )
        args = (
            redact(self._dsn),
            type(error).__name__,
            error,
            len(self._pending),
            self.pending_rows,
            self._failures,
            delay,
        )
        # The first failure of an outage is a warning; the retries are quieter.
        (log.warning if self._failures == 1 else log.info)(message, *args)
