"""Event-loop lag: how late a timer set on the event loop fires. Every request waits that long
too, so it is the first figure to read when pixel latency grows."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from server.metrics import Metrics

INTERVAL = 0.25  # seconds between measurements
WINDOW = 60.0  # seconds over which the largest lag is kept


class LoopLag:
    def __init__(self, interval: float = INTERVAL, window: float = WINDOW) -> None:
        self.interval = interval
        self.window = window
        self.last = 0.0
        self._recent: collections.deque[tuple[float, float]] = collections.deque()

    @property
    def max(self) -> float:
        """The largest lag measured over the last ``window`` seconds."""
        return max((lag for _, lag in self._recent), default=0.0)

    def record(self, now: float, lag: float) -> None:
        self.last = lag
        self._recent.append((now, lag))
        while self._recent[0][0] < now - self.window:
            self._recent.popleft()

    async def run(self) -> None:
        """Measures until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.record(now, max(0.0, now - due))


def setup(app: web.Application, metrics: Metrics) -> None:
    """Measures the lag while the app runs, as two gauges of ``metrics``."""
    lag = LoopLag()
    metrics.gauge(
        "pixel_event_loop_lag_seconds",
        "How late the event loop ran a timer, last measured",
        lambda: lag.last,
        "max",
    )
    metrics.gauge(
        "pixel_event_loop_lag_max_seconds",
        f"How late the event loop ran a timer, the most over the last {WINDOW:g} s",
        lambda: lag.max,
        "max",
    )

    async def measuring(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(lag.run(), name="loop-lag")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(measuring)
