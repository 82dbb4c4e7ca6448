"""The operator page on the admin port: the last hours at a glance.

``GET /`` is one self-contained page (``server/static/dashboard.html``: its CSS and JavaScript
inline, nothing from a CDN) that fetches ``GET /api/summary?hours=N`` every 15 seconds:
impressions, viewable and clicks over time, the top campaigns, creatives and affiliates with
CTR and viewability rate, and the health of flushing. The summary reads the aggregated counts
(``pixel_counts``, two statements per call, each one pass over the range) and the metrics; it
never holds a connection between calls, and a database that is down is reported, not raised.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import asyncpg
from aiohttp import web

from server import metrics
from server.app_keys import CONFIG, DSN, METRICS_SNAPSHOT
from server.dsn import redact
from server.logs import describe
from server.report import MEASURES, RATES, iso_utc

DEFAULT_HOURS = 6
MAX_HOURS = 14 * 24
TOP = 10
# Chart steps, in seconds: the finest that is no finer than a bucket and gives at most
# MAX_POINTS points.
STEPS = (60, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
MAX_POINTS = 120
CONNECT_TIMEOUT = 5.0
QUERY_TIMEOUT = 30.0

PAGE = resources.files("server").joinpath("static/dashboard.html").read_bytes()
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    # Dimension values come from the public pixel port: the page writes them as text only,
    # and this keeps anything else from running or loading.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline';"
    " style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# One pass over the range: a row per step, and the totals (the ROLLUP row, time NULL).
SERIES = f"""
SELECT date_bin($3, bucket, TIMESTAMPTZ 'epoch') AS time,
       {", ".join(f"{sql} AS {name}" for name, sql in MEASURES.items())}
FROM pixel_counts
WHERE bucket >= $1 AND bucket < $2
GROUP BY ROLLUP (time)
ORDER BY time NULLS FIRST
"""

# One pass over the range for the three top lists; GROUPING() tells which list a row is in.
_TOPS = {
    3: ("campaigns", ("campaign",)),  # creative and affiliate rolled up
    1: ("creatives", ("campaign", "creative")),
    6: ("affiliates", ("affiliate",)),
}
TOP_LISTS = f"""
SELECT * FROM (
    SELECT GROUPING(campaign, creative, affiliate) AS list, campaign, creative, affiliate,
           {", ".join(f"{sql} AS {name}" for name, sql in MEASURES.items())},
           row_number() OVER (PARTITION BY GROUPING(campaign, creative, affiliate)
                              ORDER BY sum(impressions) DESC, campaign, creative, affiliate) AS rank
    FROM pixel_counts
    WHERE bucket >= $1 AND bucket < $2
    GROUP BY GROUPING SETS ((campaign), (campaign, creative), (affiliate))
) ranked
WHERE rank <= $3
ORDER BY list, rank
"""


def setup(admin: web.Application) -> None:
    """Adds the page and its data to the admin app (which holds ``CONFIG``, ``DSN`` and
    ``METRICS_SNAPSHOT``)."""
    admin.router.add_get("/", page)
    admin.router.add_get("/api/summary", summary)


async def page(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, headers=PAGE_HEADERS)


async def summary(request: web.Request) -> web.Response:
    """The page's data as JSON; 503, with the flush health and the error, when the database
    cannot answer."""
    try:
        hours = min(MAX_HOURS, max(1, int(request.query.get("hours", DEFAULT_HOURS))))
    except ValueError:
        raise web.HTTPBadRequest(text="hours must be a whole number\n") from None
    app = request.app
    step = choose_step(hours, app[CONFIG].bucket_seconds)
    end = datetime.now(UTC)
    start = datetime.fromtimestamp((end.timestamp() - hours * 3600) // step * step, UTC)
    body: dict[str, Any] = {
        "generated_at": iso_utc(end),
        "hours": hours,
        "start": iso_utc(start),
        "end": iso_utc(end),
        "step_seconds": step,
        "flush": flush_health(await app[METRICS_SNAPSHOT]()),
        "database": {"ok": True, "error": None},
        "totals": None,
        "series": [],
        "top": {name: [] for name, _ in _TOPS.values()},
    }
    dsn = app[DSN]
    try:
        connection = await asyncpg.connect(
            dsn, timeout=CONNECT_TIMEOUT, command_timeout=QUERY_TIMEOUT
        )
        try:
            series = await connection.fetch(SERIES, start, end, timedelta(seconds=step))
            tops = await connection.fetch(TOP_LISTS, start, end, TOP)
        finally:
            await connection.close()
    except asyncpg.UndefinedTableError:
        body["database"] = {"ok": False, "error": "no pixel_counts table yet"}
        return web.json_response(body, status=503)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        body["database"] = {"ok": False, "error": f"{redact(dsn)}: {describe(error)}"}
        return web.json_response(body, status=503)
    totals, *steps = series
    # An empty range still has its totals row, of NULL sums.
    body["totals"] = {
        name: totals[name] if totals[name] is not None or name in RATES else 0 for name in MEASURES
    }
    body["series"] = _fill(steps, start, end, step)
    for row in tops:
        name, columns = _TOPS[row["list"]]
        body["top"][name].append({key: row[key] for key in (*columns, *MEASURES)})
    return web.json_response(body)


def choose_step(hours: int, bucket_seconds: int) -> int:
    """The chart's step in seconds.

    >>> choose_step(6, 60), choose_step(24, 60), choose_step(6, 3600)
    (300, 900, 3600)
    """
    for step in STEPS:
        if step >= bucket_seconds and hours * 3600 / step <= MAX_POINTS:
            return step
    return STEPS[-1]


def _fill(rows: list[Any], start: datetime, end: datetime, step: int) -> list[dict[str, Any]]:
    """One point per step from start to end, zero where nothing was counted."""
    found = {row["time"]: row for row in rows}
    points = []
    moment = start
    while moment < end:
        row = found.get(moment)
        points.append(
            {
                "time": iso_utc(moment),
                **{name: row[name] if row else 0 for name in ("impressions", "viewable", "clicks")},
            }
        )
        moment += timedelta(seconds=step)
    return points


def flush_health(snapshot: metrics.Snapshot) -> dict[str, Any]:
    """What the page shows of flushing, from the metrics (every worker's, where merged)."""

    def value(name: str) -> float:
        return metrics.value(snapshot, name)

    durations = snapshot.get("pixel_flush_duration_seconds")
    flushes_timed = sum(durations["counts"]) if durations else 0
    last = value("pixel_last_flush_timestamp_seconds")
    return {
        "ready": bool(value("pixel_flusher_ready")),
        "last_flush": iso_utc(datetime.fromtimestamp(last, UTC)) if last else None,
        "seconds_since_last_flush": round(time.time() - last, 1) if last else None,
        "flushes": value("pixel_flushes_total"),
        "failures": value("pixel_flush_failures_total"),
        "flushed_rows": value("pixel_flushed_rows_total"),
        "mean_flush_seconds": durations["sum"] / flushes_timed
        if durations and flushes_timed
        else None,
        "pending_batches": value("pixel_pending_batches"),
        "spool_batches": value("pixel_spool_batches"),
        "spool_bytes": value("pixel_spool_bytes"),
        "spool_max_bytes": value("pixel_spool_max_bytes"),
        "dropped_rows": value("pixel_dropped_rows_total"),
        "dead_lettered_batches": value("pixel_dead_lettered_batches_total"),
        "keys": value("pixel_keys"),
        "loop_lag_max_seconds": value("pixel_event_loop_lag_max_seconds"),
    }
