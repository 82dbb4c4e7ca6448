"""The typed application keys, in one place."""

from __future__ import annotations

from aiohttp import web

from _fastcount import Counters
from server.config import Config
from server.flusher import Flusher
from server.metrics import Metrics

CONFIG = web.AppKey("config", Config)
COUNTERS = web.AppKey("counters", Counters)
METRICS = web.AppKey("metrics", Metrics)
FLUSHER = web.AppKey("flusher", Flusher)
