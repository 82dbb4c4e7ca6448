"""A database that cannot be reached: pixels answered, a clear log line, counts kept and
written once it is back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from tests.harness import DatabaseProxy, PixelServer, fetch, wait_for

UA = {"User-Agent": "Mozilla/5.0 outage-test"}


async def readyz(session: aiohttp.ClientSession, server: PixelServer) -> int:
    async with session.get(f"{server.base_url}/readyz") as answer:
        return answer.status


async def test_unreachable_at_start_then_back(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    proxy = DatabaseProxy(database)
    dsn = proxy.dsn(password="hunter2-secret")
    server = pixel_server(f"--dsn={dsn}", "--flush-interval=0.1")
    async with aiohttp.ClientSession(headers=UA) as session:
        for n in range(50):
            async with session.get(f"{server.base_url}/i.gif?cid=outage&crid={n % 5}") as answer:
                assert answer.status == 200
                assert len(await answer.read()) == 43
        await wait_for(lambda: "cannot write to database" in server.log())
        assert await readyz(session, server) == 503
        log = server.log()
        assert f"postgresql://postgres:***@127.0.0.1:{proxy.port}/" in log
        assert "hunter2-secret" not in log
        assert "Traceback" not in log

        await proxy.open()
        try:
            ready = False
            for _ in range(300):
                if await readyz(session, server) == 200:
                    ready = True
                    break
                await asyncio.sleep(0.1)
            assert ready, server.log()
            rows = await fetch(database, "SELECT sum(impressions)::int FROM pixel_counts")
            assert rows[0][0] == 50
            assert await asyncio.to_thread(server.terminate) == 0
        finally:
            await proxy.close()
    rows = await fetch(database, "SELECT creative, impressions FROM pixel_counts ORDER BY 1")
    assert [tuple(row) for row in rows] == [(str(n), 10) for n in range(5)]
    assert "is back" in server.log()


async def test_cut_off_while_running_keeps_counting_and_catches_up(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    proxy = DatabaseProxy(database)
    await proxy.open()
    server = pixel_server(f"--dsn={proxy.dsn()}", "--flush-interval=0.1")
    try:
        async with aiohttp.ClientSession(headers=UA) as session:
            await wait_for(lambda: "connected to" in server.log())
            async with session.get(f"{server.base_url}/i.gif?cid=before") as answer:
                assert answer.status == 200
            await proxy.close()
            for _ in range(20):
                async with session.get(f"{server.base_url}/i.gif?cid=during") as answer:
                    assert answer.status == 200
            await wait_for(lambda: "cannot write to database" in server.log())
            assert await readyz(session, server) == 503
            await proxy.open()
            async with session.get(f"{server.base_url}/i.gif?cid=after") as answer:
                assert answer.status == 200
            assert await asyncio.to_thread(server.terminate) == 0, server.log()
    finally:
        await proxy.close()
    rows = await fetch(database, "SELECT campaign, impressions FROM pixel_counts ORDER BY 1")
    assert [tuple(row) for row in rows] == [("after", 1), ("before", 1), ("during", 20)]
