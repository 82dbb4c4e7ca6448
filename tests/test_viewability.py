"""The viewability endpoints on the wire: ``/v.gif`` events, what bad input and bodies cost,
the ``/v.js`` script's caching, and the snippet. (The rule itself: test_viewability_browser.py.)"""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from _fastcount import MEASURABLE, VIEWABLE
from loadtests.processes import PIXEL_SERVER
from server import givt, viewability
from server.pixel import GIF
from server.query import Rejected
from server.viewability import SCRIPT, accepts_gzip, compact, parse_event
from tests.harness import PixelServer, fetch, metric
from tests.raw_http import exchange, split, status_codes
from tests.test_hardening import BROWSER

NO_CACHE = {
    "cache-control": "no-cache, no-store, must-revalidate",
    "pragma": "no-cache",
    "expires": "0",
    "x-content-type-options": "nosniff",
}


def request(
    method: str, target: str, *headers: str, body: bytes = b"", close: bool = True
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: t", f"User-Agent: {BROWSER}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def send(server: PixelServer, data: bytes) -> bytes:
    return await asyncio.to_thread(exchange, server.port, data)


async def stored(database: str) -> list[tuple[object, ...]]:
    rows = await fetch(
        database,
        "SELECT campaign, creative, affiliate, sub_id, sum(impressions)::int,"
        " sum(givt_impressions)::int, sum(measurable)::int, sum(viewable)::int"
        " FROM pixel_counts GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
    )
    return [tuple(row) for row in rows]


async def send_admin(server: PixelServer) -> bytes:
    answer = await asyncio.to_thread(
        exchange,
        server.admin_port,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    return split(answer)[2]


@pytest.fixture
def server(pixel_server: Callable[..., PixelServer], database: str) -> PixelServer:
    return pixel_server(f"--dsn={database}", "--flush-interval=0.1")


@pytest.mark.parametrize(
    ("query", "outcome"),
    [
        (b"e=m", MEASURABLE),
        (b"cid=x&e=v&cb=1", VIEWABLE),
        (b"cid=x", "missing_event"),
        (b"e=&cid=x", "missing_event"),
        (b"e", "missing_event"),
        (b"e=x", "unknown_event"),
        (b"e=M", "unknown_event"),
        (b"e=mv", "unknown_event"),
        (b"e=%6D", "unknown_event"),
        (b"e=m&e=v", "repeated_parameter"),
    ],
)
def test_the_event_parameter(query: bytes, outcome: int | str) -> None:
    if isinstance(outcome, int):
        assert parse_event(query) == outcome
    else:
        with pytest.raises(Rejected) as rejected:
            parse_event(query)
        assert rejected.value.reason == outcome


async def test_events_count_on_get_and_post_never_on_head(
    server: PixelServer, database: str
) -> None:
    query = "/v.gif?cid=c1&crid=cr1&aff=a1&sub=s1&cb=42"
    for event in ("m", "v"):
        status, headers, body = split(await send(server, request("GET", f"{query}&e={event}")))
        assert (status, body) == (b"HTTP/1.1 200 OK", GIF)
        assert headers["content-type"] == "image/gif"
        assert NO_CACHE.items() <= headers.items()
        assert "set-cookie" not in headers

        status, headers, body = split(await send(server, request("POST", f"{query}&e={event}")))
        assert (status, body) == (b"HTTP/1.1 204 No Content", b"")
        assert NO_CACHE.items() <= headers.items()
        assert "content-type" not in headers
        assert "set-cookie" not in headers

        status, _, body = split(await send(server, request("HEAD", f"{query}&e={event}")))
        assert (status, body) == (b"HTTP/1.1 200 OK", b"")
    assert server.terminate() == 0
    assert await stored(database) == [("c1", "cr1", "a1", "s1", 0, 0, 2, 2)]


BAD_EVENTS = [
    ("GET", "cid=a", "missing_event"),
    ("POST", "e=&cid=a", "missing_event"),
    ("GET", "e=x&cid=a", "unknown_event"),
    ("POST", "e=viewable&cid=a", "unknown_event"),
    ("GET", "e=m&e=v&cid=a", "repeated_parameter"),
    ("GET", "e=v&cid=%zz", "bad_percent_encoding"),
    ("POST", "e=m&cid=" + "a" * 129, "value_too_long"),
    ("POST", "e=m&sub=%0A", "control_character"),
]


async def test_bad_events_are_answered_and_counted_as_rejected_by_reason(
    server: PixelServer, database: str
) -> None:
    for method, query, _ in BAD_EVENTS:
        status, _, body = split(await send(server, request(method, f"/v.gif?{query}")))
        assert status == (b"HTTP/1.1 200 OK" if method == "GET" else b"HTTP/1.1 204 No Content")
        assert body == (GIF if method == "GET" else b"")
    await send(server, request("GET", "/v.gif?e=m&cid=good"))
    metrics = (await send_admin(server)).decode()
    for reason in {reason for _, _, reason in BAD_EVENTS}:
        expected = sum(1 for _, _, r in BAD_EVENTS if r == reason)
        assert metric(metrics, "pixel_rejected_requests_total", f'reason="{reason}"') == expected, (
            reason
        )
    assert server.terminate() == 0
    assert await stored(database) == [("good", "", "", "", 0, 0, 1, 0)]


async def test_givt_is_never_measurable_or_viewable(server: PixelServer, database: str) -> None:
    """pixel_counts has no GIVT column for these events: GIVT shows in the metric only."""
    no_agent = b"GET /v.gif?e=m&cid=bot HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    await send(server, no_agent)
    await send(server, request("POST", "/v.gif?e=v&cid=bot", "Sec-Purpose: prefetch"))
    await send(server, request("GET", "/v.gif?e=v&cid=bot", "Purpose: prefetch"))
    bot = request("POST", "/v.gif?e=m&cid=bot").replace(
        BROWSER.encode(),
        b"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    )
    await send(server, bot)
    metrics = (await send_admin(server)).decode()
    assert metric(metrics, "pixel_givt_requests_total", f'reason="{givt.EMPTY_USER_AGENT}"') == 1
    assert metric(metrics, "pixel_givt_requests_total", f'reason="{givt.PREFETCH}"') == 2
    assert metric(metrics, "pixel_givt_requests_total", f'reason="{givt.KNOWN_BOT}"') == 1
    assert server.terminate() == 0
    assert await stored(database) == []


async def test_a_small_body_is_ignored_and_the_connection_kept(
    server: PixelServer, database: str
) -> None:
    beacon = request("POST", "/v.gif?e=m&cid=small", body=b"x" * 100, close=False)
    answer = await send(server, beacon + request("GET", "/v.gif?e=v&cid=small"))
    assert status_codes(answer) == [204, 200]
    assert answer.endswith(GIF)
    assert server.terminate() == 0
    assert await stored(database) == [("small", "", "", "", 0, 0, 1, 1)]


def exchange_until_closed(port: int, data: bytes, idle: float = 5.0) -> tuple[bytes, bool]:
    """Sends raw bytes; returns the answer, and whether the server closed the connection
    (rather than leaving it open, silent, for ``idle`` seconds)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=idle) as connection:
        try:
            connection.sendall(data)
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            return b"".join(chunks), False
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed with the body unread: the kernel answers the rest with a reset
    return b"".join(chunks), True


@pytest.mark.parametrize(
    ("head", "body", "pipelined"),
    [
        ("Content-Length: 1073741824", b"y" * 65536, True),
        ("Content-Length: 1073741824\r\nExpect: 100-continue", b"", False),
        ("Transfer-Encoding: chunked", b"10000\r\n" + b"y" * 65536, False),
    ],
)
async def test_a_large_body_is_not_read_and_the_connection_closed(
    server: PixelServer, database: str, head: str, body: bytes, pipelined: bool
) -> None:
    """The answer comes without the body being waited for (1 GiB announced, at most 64 KiB
    sent, no 100 Continue), and the server closes the connection rather than read on: a request
    pipelined behind is not answered. The server goes on serving."""
    beacon = request("POST", "/v.gif?e=m&cid=large", head, close=False) + body
    if pipelined:
        beacon += request("GET", "/v.gif?e=v&cid=large")
    answer, closed = await asyncio.to_thread(exchange_until_closed, server.port, beacon)
    assert closed
    assert status_codes(answer) == [204], answer[:300]
    assert split(answer)[1]["connection"] == "close"
    healthy = await send(server, request("GET", "/healthz"))
    assert healthy.startswith(b"HTTP/1.1 200 OK")
    assert server.terminate() == 0
    assert await stored(database) == [("large", "", "", "", 0, 0, 1, 0)]


class ScriptTag(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = dict(attrs)


def test_the_script_is_small_and_served_without_its_comments() -> None:
    source = (Path(viewability.__file__).parent / "static" / "v.js").read_text()
    served = SCRIPT.body.decode()
    assert served == compact(source)
    assert "// " in source
    assert all(
        line and line == line.strip() and not line.startswith("//") for line in served.splitlines()
    )
    # The budget: under 2 KB minified and gzipped (about 1 KB as written).
    assert len(SCRIPT.gzipped) < 2048
    assert gzip.decompress(SCRIPT.gzipped) == SCRIPT.body


@pytest.mark.parametrize(
    ("accept", "gzipped"),
    [
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.8", True),
        ("*", True),
        ("", False),
        ("identity", False),
        ("gzip;q=0", False),
        ("*, gzip;q=0", False),
        ("gzip;q=nonsense", False),
    ],
)
def test_accept_encoding(accept: str, gzipped: bool) -> None:
    assert accepts_gzip(accept) is gzipped


async def test_the_script_is_cacheable_with_an_etag_and_gzip(server: PixelServer) -> None:
    status, plain, body = split(await send(server, request("GET", "/v.js")))
    assert status == b"HTTP/1.1 200 OK"
    assert body == SCRIPT.body
    assert plain["content-type"] == "application/javascript; charset=utf-8"
    assert plain["cache-control"] == "public, max-age=3600"
    assert plain["vary"] == "Accept-Encoding"
    assert "content-encoding" not in plain
    etag = plain["etag"]
    assert etag.startswith('"') and etag.endswith('"')  # strong

    status, zipped, body = split(
        await send(server, request("GET", "/v.js", "Accept-Encoding: gzip, deflate"))
    )
    assert status == b"HTTP/1.1 200 OK"
    assert zipped["content-encoding"] == "gzip"
    assert int(zipped["content-length"]) == len(body) < 2048
    assert gzip.decompress(body) == SCRIPT.body
    assert zipped["etag"] not in (etag, f"W/{etag}")

    for tag in (etag, f'"other", W/{etag}', "*"):
        status, headers, body = split(
            await send(server, request("GET", "/v.js", f"If-None-Match: {tag}"))
        )
        assert (status, body) == (b"HTTP/1.1 304 Not Modified", b""), tag
        assert headers["etag"] == etag
    status, headers, body = split(
        await send(
            server,
            request("GET", "/v.js", "Accept-Encoding: gzip", f"If-None-Match: {zipped['etag']}"),
        )
    )
    assert (status, body, headers["etag"]) == (b"HTTP/1.1 304 Not Modified", b"", zipped["etag"])
    # The list may come in several field lines: a match in any of them counts.
    status, _, body = split(
        await send(
            server, request("GET", "/v.js", 'If-None-Match: "old"', f"If-None-Match: {etag}")
        )
    )
    assert (status, body) == (b"HTTP/1.1 304 Not Modified", b"")
    # A copy of the other encoding is not the representation selected: it is sent in full.
    for tag in ('"old"', zipped["etag"]):
        status, headers, body = split(
            await send(server, request("GET", "/v.js", f"If-None-Match: {tag}"))
        )
        assert (status, body, headers["etag"]) == (b"HTTP/1.1 200 OK", SCRIPT.body, etag), tag
    status, headers, body = split(
        await send(
            server, request("GET", "/v.js", "Accept-Encoding: gzip", f"If-None-Match: {etag}")
        )
    )
    assert (status, headers["content-encoding"]) == (b"HTTP/1.1 200 OK", "gzip")
    assert gzip.decompress(body) == SCRIPT.body

    status, head, body = split(await send(server, request("HEAD", "/v.js")))
    assert (status, body) == (b"HTTP/1.1 200 OK", b"")
    assert head["etag"] == etag
    assert server.terminate() == 0


def test_the_snippet_command_prints_the_pixel_and_the_script() -> None:
    output = subprocess.run(
        [
            PIXEL_SERVER,
            "snippet",
            "--cid=spring sale",
            "--crid=b&1",
            '--aff=p"7',
            "--sub=<top>",
            "--base-url=https://px.example/",
            "--video",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    parsed = ScriptTag()
    parsed.feed(output)
    assert parsed.tags["img"]["src"] == (
        "https://px.example/i.gif?cid=spring%20sale&crid=b%261&aff=p%227&sub=%3Ctop%3E"
        "&cb=[CACHEBUSTER]"
    )
    assert parsed.tags["script"] == {
        "async": None,
        "src": "https://px.example/v.js",
        "data-cid": "spring sale",
        "data-crid": "b&1",
        "data-aff": 'p"7',
        "data-sub": "<top>",
        "data-format": "video",
    }
    assert "a" not in parsed.tags  # no click link without --to


def test_the_snippet_command_adds_a_signed_click_link_given_a_destination() -> None:
    output = subprocess.run(
        [
            PIXEL_SERVER,
            "snippet",
            "--cid=spring",
            "--base-url=https://px.example",
            "--to=https://shop.example/p?id=1",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PIXEL_SECRET": "s" * 32},
    ).stdout
    parsed = ScriptTag()
    parsed.feed(output)
    href = parsed.tags["a"]["href"] or ""
    assert href.startswith("https://px.example/c?cid=spring&")
    assert "&to=https%3A%2F%2Fshop.example%2Fp%3Fid%3D1&" in href
    assert "&sig=" in href


def test_the_snippet_command_refuses_invalid_dimensions() -> None:
    result = subprocess.run(
        [PIXEL_SERVER, "snippet", "--cid=a\x01b", "--base-url=https://px.example"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "control_character" in result.stderr
