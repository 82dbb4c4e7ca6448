"""The typed application keys, in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from _fastcount import Counters
from server.config import Config
from server.flusher import Flusher
from server.metrics import Metrics, Snapshot

CONFIG = web.AppKey("config", Config)
COUNTERS = web.AppKey("counters", Counters)
METRICS = web.AppKey("metrics", Metrics)
FLUSHER = web.AppKey("flusher", Flusher)
# The database the flusher writes to (and the admin app's operator page reads).
DSN = web.AppKey("dsn", str)
# On the admin app: the metrics it reports, this process's or every worker's merged.
METRICS_SNAPSHOT: web.AppKey[Callable[[], Awaitable[Snapshot]]] = web.AppKey("metrics_snapshot")
