"""The operator page, in Debian's chromium, against a real server whose database holds known
counts: the figures it shows, that it loads nothing from elsewhere, and what it shows while the
database is down."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from tests.browser import chromium, new_context
from tests.harness import DatabaseProxy, PixelServer, insert_counts

# (minutes ago, campaign, creative, affiliate, sub_id, impressions, givt_impressions,
# measurable, viewable, clicks, givt_clicks)
KNOWN = [
    (10, "spring", "banner-1", "partner-7", "top", 1000, 10, 800, 600, 20, 3),
    (70, "spring", "banner-2", "partner-8", "", 500, 0, 400, 100, 5, 0),
    (180, "<b>x</b>", "c", "partner-9", "s", 10, 0, 0, 0, 0, 0),
    (300, "summer", "banner-1", "partner-7", "top", 2000, 40, 1000, 900, 100, 4),
    (480, "autumn", "banner-1", "partner-7", "top", 99_999, 0, 0, 0, 0, 9),  # before the 6 hours
]
# What the page shows for a rate of nothing (an en dash).
NO_RATE = "\u2013"
# A copy of the screenshot, to look at after a run.
SCREENSHOT_COPY = Path("/tmp/dashboard.png")


async def insert_known(dsn: str) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    await insert_counts(dsn, [(now - timedelta(minutes=row[0]), *row[1:]) for row in KNOWN])


async def wait_ready(server: PixelServer, timeout: float = 20.0) -> None:
    """Until /readyz is 200: the flusher has connected and migrated the schema."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{server.base_url}/readyz") as answer:
                if answer.status == 200:
                    return
            assert time.monotonic() < deadline, server.log()
            await asyncio.sleep(0.05)


async def cells(page: Any, table: str) -> list[list[str]]:
    rows: list[list[str]] = await page.eval_on_selector_all(
        f"#{table} tbody tr", "rows => rows.map(row => Array.from(row.cells, c => c.textContent))"
    )
    return rows


async def test_the_page_shows_the_known_counts(
    pixel_server: Callable[..., PixelServer], database: str, tmp_path: Path
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    await wait_ready(server)
    await insert_known(database)
    requested: list[str] = []
    async with chromium() as browser:
        context = await new_context(browser)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: requested.append(request.url))
        await page.goto(f"{server.admin_url}/?hours=6")
        await page.wait_for_selector("body[data-state=ready]")

        async def text(selector: str) -> str:
            found: str = await page.text_content(selector) or ""
            return found

        assert await text("#kpi-impressions") == "3,510"
        assert await text("#kpi-givt_impressions") == "50"
        assert await text("#kpi-measurable") == "2,200"
        assert await text("#kpi-viewable") == "1,600"
        assert await text("#kpi-viewability_rate") == "72.73%"
        assert await text("#kpi-clicks") == "125"
        assert await text("#kpi-givt_clicks") == "7"
        assert await text("#kpi-ctr") == "3.56%"
        assert await cells(page, "top-campaigns") == [
            ["summer", "2,000", "900", "90.00%", "100", "5.00%"],
            ["spring", "1,500", "700", "58.33%", "25", "1.67%"],
            ["<b>x</b>", "10", "0", NO_RATE, "0", "0.00%"],  # shown as text, never as HTML
        ]
        assert await cells(page, "top-creatives") == [
            ["summer", "banner-1", "2,000", "900", "90.00%", "100", "5.00%"],
            ["spring", "banner-1", "1,000", "600", "75.00%", "20", "2.00%"],
            ["spring", "banner-2", "500", "100", "25.00%", "5", "1.00%"],
            ["<b>x</b>", "c", "10", "0", NO_RATE, "0", "0.00%"],
        ]
        assert await cells(page, "top-affiliates") == [
            ["partner-7", "3,000", "1,500", "83.33%", "120", "4.00%"],
            ["partner-8", "500", "100", "25.00%", "5", "1.00%"],
            ["partner-9", "10", "0", NO_RATE, "0", "0.00%"],
        ]
        assert await page.locator("#top-campaigns tbody b").count() == 0
        # The chart: one point per 5 minutes over the 6 hours, adding up to the totals.
        chart = {
            key: await page.eval_on_selector(
                f"#chart g[data-series={key}]",
                "g => [Number(g.dataset.total), Number(g.dataset.points)]",
            )
            for key in ("impressions", "viewable", "clicks")
        }
        assert [total for total, _ in chart.values()] == [3510, 1600, 125]
        assert {points for _, points in chart.values()} <= {72, 73}
        assert await text("#step") == "5 min"
        assert await text("#flush-state") == "OK"
        assert await text("#flush-failures") == "0"
        assert await text("#flush-dropped") == "0"
        assert await text("#flush-pending") == "0"
        assert (await text("#flush-spool")).startswith("0 batches, 0 B of 1.0 GiB")
        assert await page.is_hidden("#error")
        await page.set_viewport_size({"width": 1400, "height": 1000})
        await page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
        shutil.copy(tmp_path / "dashboard.png", SCREENSHOT_COPY)
    assert errors == []
    # Self-contained: everything it loaded came from the admin port.
    assert requested
    assert all(url.startswith(server.admin_url + "/") for url in requested), requested
    assert server.terminate() == 0


async def test_the_page_says_when_the_database_is_down(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    proxy = DatabaseProxy(database)  # never opened: the database is unreachable
    server = pixel_server(f"--dsn={proxy.dsn(password='hunter2-secret')}", "--flush-interval=0.1")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.admin_url}/api/summary") as answer,
    ):
        assert answer.status == 503
        summary = await answer.json()
    assert summary["database"]["ok"] is False
    assert summary["database"]["error"].startswith(
        f"postgresql://postgres:***@127.0.0.1:{proxy.port}/"
    )
    assert "hunter2" not in str(summary)
    assert summary["flush"]["ready"] is False
    assert summary["totals"] is None
    async with chromium() as browser:
        page = await (await new_context(browser)).new_page()
        await page.goto(f"{server.admin_url}/")
        await page.wait_for_selector("body[data-state=database-error]")
        assert "The database cannot be read" in (await page.text_content("#error") or "")
        assert await page.text_content("#flush-state") == "PROBLEM"
    assert server.terminate() == 0


async def test_the_page_and_its_data_answer_as_an_admin_page_should(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.admin_url}/") as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
            assert answer.headers["Cache-Control"] == "no-store"
            assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
            page = await answer.text()
        assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in page
        async with session.get(f"{server.admin_url}/api/summary?hours=many") as answer:
            assert answer.status == 400
        async with session.get(f"{server.base_url}/") as answer:
            assert answer.status == 404  # never on the public port
    assert server.terminate() == 0


async def test_the_admin_port_on_loopback_answers_only_to_loopback_names(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    """DNS rebinding: a page the operator visits points a name of its own at 127.0.0.1 and
    reads the admin port through the operator's browser, its Host header that name. The port
    listens on loopback, so it answers to loopback names only, and to those a reverse proxy
    in front of it passes, once named (``--admin-names``)."""
    server = pixel_server(f"--dsn={database}", "--admin-names=Dash.Example, ops.example")
    await wait_ready(server)  # the schema made: the summary reads it
    port = URL(server.admin_url).port
    async with aiohttp.ClientSession() as session:
        for host, status in [
            (f"127.0.0.1:{port}", 200),
            (f"localhost:{port}", 200),
            (f"[::1]:{port}", 200),
            (f"rebound.example:{port}", 421),
            ("rebound.example", 421),
            (f"127.0.0.1.rebound.example:{port}", 421),
            ("dash.example", 200),
            (f"OPS.example:{port}", 200),
        ]:
            for path in ("/", "/api/summary", "/metrics"):
                headers = {"Host": host}
                async with session.get(f"{server.admin_url}{path}", headers=headers) as answer:
                    assert answer.status == status, (host, path)
                    if status == 421:
                        assert "pixel" not in await answer.text()
    assert server.terminate() == 0
