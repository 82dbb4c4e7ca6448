"""The pixel on the wire: exact bytes and headers, and what HEAD and bad methods count."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from server import protocol
from server.app import make_app
from server.config import Config
from server.pixel import GIF
from tests.harness import PixelServer, fetch, wait_for
from tests.raw_http import exchange, split

TRANSPARENT_GIF = bytes.fromhex(
    "4749463839610100010080000000000000000021f90401000000002c00000000010001000002024401003b"
)


def test_the_gif_is_the_43_byte_transparent_gif89a() -> None:
    assert GIF == TRANSPARENT_GIF
    assert len(GIF) == 43


async def test_get_answers_exact_bytes_and_headers(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    answer = await asyncio.to_thread(
        exchange,
        server.port,
        b"GET /i.gif?cid=c1&crid=cr1&aff=a1&sub=s1&cb=123 HTTP/1.1\r\nHost: t\r\n"
        b"User-Agent: Mozilla/5.0 test\r\nConnection: close\r\n\r\n",
    )
    status, headers, body = split(answer)
    assert status == b"HTTP/1.1 200 OK"
    assert body == TRANSPARENT_GIF
    assert headers["content-type"] == "image/gif"
    assert headers["content-length"] == "43"
    assert headers["cache-control"] == "no-cache, no-store, must-revalidate"
    assert headers["pragma"] == "no-cache"
    assert headers["expires"] == "0"
    assert headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in headers
    assert "date" in headers
    assert server.terminate() == 0
    rows = await fetch(
        database, "SELECT campaign, creative, affiliate, sub_id, impressions FROM pixel_counts"
    )
    assert [tuple(row) for row in rows] == [("c1", "cr1", "a1", "s1", 1)]


async def test_head_gets_the_same_headers_no_body_and_counts_nothing(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    request = (
        b"/i.gif?cid=head HTTP/1.1\r\nHost: t\r\nUser-Agent: Mozilla/5.0\r\n"
        b"Connection: close\r\n\r\n"
    )
    get = await asyncio.to_thread(exchange, server.port, b"GET " + request)
    head = await asyncio.to_thread(exchange, server.port, b"HEAD " + request)
    get_status, get_headers, _ = split(get)
    head_status, head_headers, head_body = split(head)
    assert head_status == get_status == b"HTTP/1.1 200 OK"
    assert head_body == b""
    get_headers.pop("date")
    head_headers.pop("date")
    assert head_headers == get_headers
    assert server.terminate() == 0
    rows = await fetch(database, "SELECT campaign, impressions FROM pixel_counts")
    assert [tuple(row) for row in rows] == [("head", 1)]


async def test_other_methods_count_nothing_and_are_refused(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    answer = await asyncio.to_thread(
        exchange,
        server.port,
        b"DELETE /i.gif?cid=x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    assert split(answer)[0] == b"HTTP/1.1 405 Method Not Allowed"
    assert server.terminate() == 0
    assert await fetch(database, "SELECT * FROM pixel_counts") == []


async def test_keep_alive_and_pipelining_answer_in_order(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    requests = b"".join(
        b"GET /i.gif?cid=pipe&crid=%d HTTP/1.1\r\nHost: t\r\nUser-Agent: UA\r\n\r\n" % n
        for n in range(5)
    )
    last = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    answer = await asyncio.to_thread(exchange, server.port, requests + last)
    assert answer.count(b"HTTP/1.1 200 OK") == 6
    assert answer.count(TRANSPARENT_GIF) == 5
    assert answer.endswith(b"ok\n")
    assert server.terminate() == 0
    rows = await fetch(database, "SELECT creative, impressions FROM pixel_counts ORDER BY 1")
    assert [tuple(row) for row in rows] == [(str(n), 1) for n in range(5)]


def responses(answer: bytes) -> list[tuple[bytes, dict[str, str], bytes]]:
    """Splits pipelined answers, using Content-Length (HEAD answers carry no body)."""
    result = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        status, headers, _ = split(head + b"\r\n\r\n")
        is_head = not rest.startswith(b"GIF89a") and headers.get("content-type") == "image/gif"
        length = 0 if is_head else int(headers.get("content-length", "0"))
        result.append((status, headers, rest[:length]))
        answer = rest[length:]
    return result


async def test_fast_and_normal_paths_answer_alike_and_in_order(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    """Keep-alive GET and HEAD of /i.gif are answered from precomputed bytes, anything else by
    aiohttp; pipelined together, the answers keep their order and are the same answer."""
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    ua = b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    pipelined = (
        b"GET /i.gif?cid=fast HTTP/1.1\r\nHost: t\r\n" + ua + b"\r\n"
        b"HEAD /i.gif?cid=fast HTTP/1.1\r\nHost: t\r\n" + ua + b"\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /i.gif?cid=fast HTTP/1.1\r\nHost: t\r\n" + ua + b"\r\n"
        b"GET /i.gif?cid=normal HTTP/1.1\r\nHost: t\r\n" + ua + b"Connection: close\r\n\r\n"
    )
    answers = responses(await asyncio.to_thread(exchange, server.port, pipelined))
    assert [status for status, _, _ in answers] == [b"HTTP/1.1 200 OK"] * 5
    assert [body for _, _, body in answers] == [
        TRANSPARENT_GIF,
        b"",
        b"ok\n",
        TRANSPARENT_GIF,
        TRANSPARENT_GIF,
    ]
    fast, head, _, fast_again, normal = (headers for _, headers, _ in answers)
    for headers in (fast, head, fast_again, normal):
        headers.pop("date")
    normal.pop("connection")
    assert fast == head == fast_again == normal
    assert server.terminate() == 0
    rows = await fetch(database, "SELECT campaign, impressions FROM pixel_counts ORDER BY 1")
    assert [tuple(row) for row in rows] == [("fast", 2), ("normal", 1)]


async def test_a_request_cut_across_reads_and_the_requests_after_it(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    """A pixel request that arrives in pieces is read by aiohttp's parser; the requests behind
    it are answered in order, each pixel counted once."""
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")

    def pixel(campaign: bytes, connection: bytes = b"") -> bytes:
        return (
            b"GET /i.gif?cid=" + campaign + b" HTTP/1.1\r\nHost: t\r\n"
            b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n" + connection + b"\r\n"
        )

    cut = pixel(b"cut")
    pieces = [
        pixel(b"whole") + cut[:20],
        cut[20:-3],
        cut[-3:] + pixel(b"after"),
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + pixel(b"pipelined"),
        pixel(b"last", b"Connection: close\r\n"),
    ]
    answers = responses(await asyncio.to_thread(exchange, server.port, pieces))
    assert [body for _, _, body in answers] == [TRANSPARENT_GIF] * 3 + [b"ok\n"] + [
        TRANSPARENT_GIF
    ] * 2
    assert server.terminate() == 0
    rows = await fetch(database, "SELECT campaign, impressions FROM pixel_counts ORDER BY 1")
    assert [tuple(row) for row in rows] == [
        ("after", 1),
        ("cut", 1),
        ("last", 1),
        ("pipelined", 1),
        ("whole", 1),
    ]


async def test_a_client_that_reads_no_answer_is_no_longer_read(
    database: str, tmp_path: Path
) -> None:
    """Answers a client does not take are not buffered without bound: once they back up, the
    pixel port stops reading that client's requests (aiohttp's own backpressure)."""
    app = make_app(Config(spool_dir=tmp_path), database)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    server = await protocol.listen(runner, "127.0.0.1", 0, reuse_port=False)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        # Whole requests to a write, each read by the server before the next: its fast path.
        requests = b"GET /i.gif?cid=unread HTTP/1.1\r\nHost: t\r\n\r\n" * 20
        pixels = runner.server
        assert pixels is not None
        await wait_for(lambda: pixels.connections, 5.0)
        (handler,) = pixels.connections
        transport = handler.transport
        assert transport is not None
        for _ in range(20_000):  # at most 400,000 requests, 120 MB of answers
            writer.write(requests)
            await asyncio.sleep(0)
            if not transport.is_reading():
                break
        assert not transport.is_reading()
        assert transport.get_write_buffer_size() < 4 << 20
        writer.close()
    finally:
        server.close()
        await runner.cleanup()
