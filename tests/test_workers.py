"""``--workers``: several processes on one port, a supervisor that restarts and stops them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil
from yarl import URL

from loadtests.processes import PIXEL_SERVER
from tests.harness import PixelServer, fetch, free_port, scrape

UA = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) workers-test"}


async def send(server: PixelServer, query: str, times: int) -> None:
    # A new connection per request, so the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(headers=UA, connector=connector) as session:

        async def one() -> None:
            async with session.get(f"{server.base_url}/i.gif?{query}") as answer:
                assert answer.status == 200
                assert len(await answer.read()) == 43

        for _ in range(times // 20):
            await asyncio.gather(*(one() for _ in range(20)))


async def ready_workers(server: PixelServer, starts: int) -> None:
    """Waits until the supervisor has seen ``starts`` worker starts through."""
    deadline = time.monotonic() + 30
    while server.log().count(" ready (pid ") < starts:
        assert time.monotonic() < deadline, server.log()
        await asyncio.sleep(0.05)


async def stored(dsn: str) -> int:
    rows = await fetch(dsn, "SELECT coalesce(sum(impressions), 0)::bigint FROM pixel_counts")
    return int(rows[0][0])


async def test_workers_share_the_port_restart_and_flush_on_sigterm(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--workers=2", "--flush-interval=0.1")
    await ready_workers(server, 2)
    workers = psutil.Process(server.process.pid).children()
    assert len(workers) == 2

    await send(server, "cid=before", 400)
    deadline = time.monotonic() + 30
    while await stored(database) != 400:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    flushers = await fetch(database, "SELECT count(*) FROM flush_batches")
    assert flushers[0][0] >= 2
    answered = 'pixel_requests_total{endpoint="/i.gif"} 400\n'
    assert answered in await scrape(server)

    workers[0].kill()  # the supervisor restarts it; nothing of it was unflushed
    await ready_workers(server, 3)
    assert "restarting it" in server.log()
    # The dead worker's counters stay in the sums: a Prometheus counter never goes back.
    assert answered in await scrape(server)

    await send(server, "cid=after", 400)
    async with aiohttp.ClientSession(
        headers=UA, connector=aiohttp.TCPConnector(force_close=True)
    ) as session:
        for _ in range(20):
            url = URL(f"{server.base_url}/i.gif?cid=%zz", encoded=True)
            async with session.get(url) as answer:
                assert answer.status == 200
    metrics = await scrape(server)
    # The admin port sums every worker's counters.
    assert 'pixel_rejected_requests_total{reason="bad_percent_encoding"} 20' in metrics

    assert await asyncio.to_thread(server.terminate) == 0, server.log()
    rows = await fetch(
        database, "SELECT campaign, sum(impressions)::int FROM pixel_counts GROUP BY 1 ORDER BY 1"
    )
    assert [tuple(row) for row in rows] == [("after", 400), ("before", 400)]


def test_workers_that_cannot_start_stop_the_supervisor(database: str, tmp_path: Path) -> None:
    """As a single server that cannot listen exits 1, so does a supervisor whose workers
    cannot: it does not restart them forever while saying it serves."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                PIXEL_SERVER,
                "serve",
                "--host=127.0.0.1",
                f"--port={port}",
                f"--admin-port={free_port()}",
                f"--dsn={database}",
                f"--data-dir={tmp_path}",
                "--workers=2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert "worker 0 did not start; stopping" in result.stderr
    assert "workers serving pixels" not in result.stderr


async def test_workers_stop_and_flush_when_the_supervisor_is_killed(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) leaves no worker serving the
    port unsupervised: each gets SIGTERM from the kernel and makes its final flush."""
    server = pixel_server(f"--dsn={database}", "--workers=2", "--flush-interval=60")
    await ready_workers(server, 2)
    workers = psutil.Process(server.process.pid).children()
    await send(server, "cid=orphaned", 200)
    server.process.kill()
    _, alive = await asyncio.to_thread(psutil.wait_procs, workers, 30)
    assert not alive
    assert await stored(database) == 200  # their final flushes
