"""Bad input: answered with the GIF, counted by reason, never as an event, never a 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from yarl import URL

from server.pixel import GIF
from tests.harness import PixelServer, fetch, metric, scrape
from tests.raw_http import exchange

UA = {"User-Agent": "Mozilla/5.0 bad-input-test"}

BAD_QUERIES = [
    ("cid=" + "a" * 129, "value_too_long"),
    ("cid=" + "%C3%A9" * 65, "value_too_long"),
    ("cid=ab%0Acd", "control_character"),
    ("cid=%00", "control_character"),
    ("crid=%7F", "control_character"),
    ("aff=%C2%85", "control_character"),
    ("cid=%zz", "bad_percent_encoding"),
    ("cid=abc%4", "bad_percent_encoding"),
    ("sub=%ff%fe", "invalid_utf8"),
    ("cid=%C3%28", "invalid_utf8"),
    ("cid=a&cid=b", "repeated_parameter"),
    ("cid=a&sub=x&sub=x", "repeated_parameter"),
]


async def test_invalid_values_get_the_gif_and_are_counted_as_rejected(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    async with aiohttp.ClientSession(headers=UA) as session:
        for query, _ in BAD_QUERIES:
            url = f"{server.base_url}/i.gif?{query}"
            async with session.get(URL(url, encoded=True)) as answer:
                assert answer.status == 200, query
                assert await answer.read() == GIF
        # A valid one, so a broken counter would show.
        async with session.get(f"{server.base_url}/i.gif?cid=good") as answer:
            assert answer.status == 200
    metrics = await scrape(server)
    expected: dict[str, int] = {}
    for _, reason in BAD_QUERIES:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        assert metric(metrics, "pixel_rejected_requests_total", f'reason="{reason}"') == count, (
            reason
        )
    assert server.terminate() == 0
    rows = await fetch(database, "SELECT campaign, impressions FROM pixel_counts")
    assert [tuple(row) for row in rows] == [("good", 1)]


async def test_a_fragment_sent_with_the_pixel_is_no_part_of_the_query(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}")
    request = (
        b"GET /i.gif?cid=a&crid=b#frag&sub=x HTTP/1.1\r\nHost: t\r\nUser-Agent: Mozilla/5.0\r\n"
    )
    answer = await asyncio.to_thread(exchange, server.port, request + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(GIF)
    assert server.terminate() == 0
    rows = await fetch(database, "SELECT campaign, creative, sub_id, impressions FROM pixel_counts")
    assert [tuple(row) for row in rows] == [("a", "b", "", 1)]


async def test_a_user_agent_of_bytes_that_are_not_utf8_gets_the_gif_and_is_counted(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}")
    for target in (b"/i.gif?cid=bytes", b"/v.gif?cid=bytes&e=m"):
        request = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nUser-Agent: Mozilla/5.0 \xff\xfe\r\n"
        answer = await asyncio.to_thread(
            exchange, server.port, request + b"Connection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(GIF), answer
    assert server.terminate() == 0
    assert "Traceback" not in server.log()
    rows = await fetch(database, "SELECT campaign, impressions, measurable FROM pixel_counts")
    assert [tuple(row) for row in rows] == [("bytes", 1, 1)]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /i.gif?cid=" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif?cid=a HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
        b"GET /i.gif?cid=a HTTP/1.1\r\nHost: t\r\n" + b"X-H: v\r\n" * 500 + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GET /i.gif?cid=\x01\xff HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif HTTP/9.9\r\nHost: t\r\n\r\n",
    ],
    ids=[
        "long-request-line",
        "long-header",
        "many-headers",
        "tls-hello",
        "raw-bytes",
        "bad-version",
    ],
)
async def test_malformed_http_gets_a_4xx_and_the_worker_stays_up(
    pixel_server: Callable[..., PixelServer], database: str, request_bytes: bytes
) -> None:
    server = pixel_server(f"--dsn={database}")
    status = (await asyncio.to_thread(exchange, server.port, request_bytes)).partition(b"\r\n")[0]
    assert status.startswith(b"HTTP/1.1 4") or status.startswith(b"HTTP/1.0 4"), status
    async with (
        aiohttp.ClientSession(headers=UA) as session,
        session.get(f"{server.base_url}/i.gif?cid=after") as answer,
    ):
        assert answer.status == 200
    assert server.process.poll() is None
    assert server.terminate() == 0
    assert "Traceback" not in server.log()
