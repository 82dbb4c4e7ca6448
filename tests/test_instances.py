"""Several pixel-server instances flushing into one PostgreSQL over the same keys."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable

import aiohttp

from tests.harness import PixelServer, totals_by_key

INSTANCES = 3
REQUESTS_PER_INSTANCE = 4_000


async def test_three_instances_merge_exactly_without_deadlocks(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    # Fast flushes over a small, shared key space: the three merge the same rows all the time.
    servers = [
        pixel_server(f"--dsn={database}", "--flush-interval=0.05", "--bucket-seconds=1")
        for _ in range(INSTANCES)
    ]
    keys = [(f"c{n % 3}", f"cr{n % 7}", f"a{n}", "") for n in range(40)]
    sent: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
    rng = random.Random(3)

    async def client(session: aiohttp.ClientSession, server: PixelServer) -> None:
        for _ in range(REQUESTS_PER_INSTANCE // 8):
            key = rng.choice(keys)
            url = f"{server.base_url}/i.gif?cid={key[0]}&crid={key[1]}&aff={key[2]}"
            async with session.get(url) as answer:
                assert answer.status == 200
            sent[key] += 1

    headers = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) instances-test"}
    async with aiohttp.ClientSession(headers=headers) as session:
        await asyncio.gather(*(client(session, s) for s in servers for _ in range(8)))
    statuses = await asyncio.gather(*(asyncio.to_thread(s.terminate) for s in servers))
    assert statuses == [0] * INSTANCES

    stored = {key: counts[0] for key, counts in (await totals_by_key(database)).items()}
    assert stored == dict(sent)
    for server in servers:
        log = server.log()
        assert "deadlock" not in log.lower(), log
        assert "cannot write" not in log, log
