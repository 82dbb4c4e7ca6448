"""The application factories: the public pixel app and the private admin app."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import yarl
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from _fastcount import Counters
from server import clicks, dashboard, health, loop_lag, pixel, viewability
from server.app_keys import CONFIG, COUNTERS, DSN, FLUSHER, METRICS, METRICS_SNAPSHOT
from server.config import Config
from server.flusher import Flusher
from server.metrics import Metrics, Snapshot, render
from server.spool import Spool

log = logging.getLogger(__name__)

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# No public endpoint reads a body; this bounds what one ever could.
MAX_BODY_SIZE = 16 * 1024


def make_app(config: Config, dsn: str) -> web.Application:
    """The public app on the pixel port. ``dsn`` is the database the flusher writes to."""
    app = web.Application(client_max_size=MAX_BODY_SIZE)
    app[CONFIG] = config
    app[DSN] = dsn
    app[METRICS] = Metrics()
    app[COUNTERS] = Counters(max_keys=config.max_keys)
    spool = Spool(config.spool_path, config.spool_max_bytes)
    app[FLUSHER] = Flusher(
        app[COUNTERS],
        dsn,
        app[METRICS],
        config.flush_interval,
        spool,
        config.max_pending_batches,
        config.flush_connections,
        ledger_seconds=config.ledger_days * 86400,
    )
    gauge = app[METRICS].gauge
    gauge("pixel_keys", "Distinct keys counted in the current window", lambda: len(app[COUNTERS]))
    gauge(
        "pixel_pending_batches",
        "Sealed batches not yet in PostgreSQL",
        lambda: app[FLUSHER].pending_batches,
    )
    # Counted on disk: workers sharing the spool folder report the same figure, hence "max".
    gauge("pixel_spool_batches", "Batches in the disk spool", lambda: spool.batches, "max")
    gauge("pixel_spool_bytes", "Bytes in the disk spool", lambda: spool.bytes, "max")
    gauge(
        "pixel_spool_max_bytes",
        "Spool budget (--spool-max-bytes)",
        lambda: spool.max_bytes,
        "max",
    )
    gauge(
        "pixel_flusher_ready",
        "1 while the database takes every batch and the spool is within budget (as /readyz)",
        lambda: int(app[FLUSHER].ready),
        "min",
    )
    loop_lag.setup(app, app[METRICS])
    app.router.add_get("/i.gif", pixel.impression)  # add_get also routes HEAD
    app.router.add_get("/c", clicks.click)
    viewability.setup(app)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.cleanup_ctx.append(_flushing)
    return app


def snapshot_of(pixel_app: web.Application) -> Callable[[], Awaitable[Snapshot]]:
    """The metrics of one pixel app, as :func:`make_admin_app` takes them."""
    metrics = pixel_app[METRICS]

    async def this_process() -> Snapshot:
        return metrics.snapshot()

    return this_process


async def _flushing(app: web.Application) -> AsyncIterator[None]:
    """Runs the flusher; on shutdown, after the last request, makes the final flush."""
    flusher = app[FLUSHER]
    timeout = app[CONFIG].shutdown_timeout
    task = asyncio.create_task(flusher.run(), name="flusher")
    yield
    # A quarter of the time for the flush in progress, then it is cut short, which never
    # loses a sealed batch; close() takes it from there.
    await flusher.finish(task, timeout / 4)
    await flusher.close(timeout)


def make_admin_app(
    config: Config, dsn: str, metrics_snapshot: Callable[[], Awaitable[Snapshot]]
) -> web.Application:
    """The private app on the admin port: ``/metrics`` and the operator page, which reads the
    database at ``dsn``.

    ``metrics_snapshot`` gives the metrics it reports: :func:`snapshot_of` a pixel app's, or,
    with several worker processes, ``server.metrics.merge`` of every worker's
    ``Metrics.snapshot()``, so that ``/metrics`` and the page cover them all.
    """
    admin = web.Application(
        middlewares=[_loopback_names(config.admin_names)] if _loopback(config.admin_host) else []
    )
    admin[CONFIG] = config
    admin[DSN] = dsn
    admin[METRICS_SNAPSHOT] = metrics_snapshot

    async def metrics_page(request: web.Request) -> web.Response:
        snapshot = await request.app[METRICS_SNAPSHOT]()
        return web.Response(
            body=render(snapshot).encode(),
            headers={"Content-Type": PROMETHEUS_TEXT, "Cache-Control": "no-store"},
        )

    admin.router.add_get("/metrics", metrics_page)
    dashboard.setup(admin)
    return admin


def _loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine's
    loopback."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_names(also: Sequence[str]) -> Middleware:
    """On an admin port that listens on loopback only, a request over TCP must name the
    loopback in its Host, or one of ``also`` (``--admin-names``). A web page the operator
    visits could otherwise point a name of its own at 127.0.0.1 (DNS rebinding) and read the
    counts and metrics through the operator's browser. (The supervisor asks its workers over
    Unix sockets, which this leaves be.)"""

    @web.middleware
    async def loopback_names(request: web.Request, handler: Handler) -> web.StreamResponse:
        if isinstance(request.transport and request.transport.get_extra_info("peername"), tuple):
            try:
                name = yarl.URL(f"http://{request.host}").host or ""
            except ValueError:  # no host at all
                name = ""
            if not (_loopback(name) or name.lower() in also):
                return web.Response(
                    status=421,
                    text="this admin port answers to 127.0.0.1, [::1], localhost and"
                    " --admin-names only\n",
                    headers={"Cache-Control": "no-store"},
                )
        return await handler(request)

    return loopback_names
