"""Hostile input never takes the server down: raw-byte and query fuzzing against a real
process, slow clients, the admin port kept private, logs that cannot be forged."""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import time
from collections.abc import Callable
from urllib.parse import quote

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import PixelServer, totals_by_key
from tests.raw_http import exchange, status_codes

BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)


def assert_serving(server: PixelServer) -> None:
    assert server.process.poll() is None, server.log()
    answer = exchange(
        server.port,
        f"GET /i.gif?cid=alive HTTP/1.1\r\nHost: t\r\nUser-Agent: {BROWSER}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]


http_token = st.sampled_from(
    [b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"G\x00T", b"", b"GET GET"]
)
target = st.one_of(
    st.sampled_from([b"/i.gif", b"/i.gif?", b"/healthz", b"/readyz", b"/c", b"*", b""]),
    st.binary(max_size=300).map(lambda b: b"/i.gif?" + b),
)
header_line = st.one_of(
    st.binary(max_size=120),
    st.tuples(
        st.sampled_from([b"User-Agent", b"Host", b"Content-Length", b"Transfer-Encoding", b"X"]),
        st.binary(max_size=80),
    ).map(lambda pair: pair[0] + b": " + pair[1]),
)
raw_request = st.tuples(
    http_token,
    target,
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"HTTP/1.1\x00"]),
    st.lists(header_line, max_size=6),
    st.binary(max_size=200),
).map(
    lambda p: p[0] + b" " + p[1] + b" " + p[2] + b"\r\n" + b"\r\n".join(p[3]) + b"\r\n\r\n" + p[4]
)


def test_fuzzed_raw_requests_never_get_a_5xx_or_kill_the_worker(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--secret=fuzz-secret-0123456789")

    @FUZZ
    @given(st.one_of(raw_request, st.binary(max_size=600)))
    def probe(request: bytes) -> None:
        answer = exchange(server.port, request, idle=0.25)
        assert not [code for code in status_codes(answer) if code >= 500], answer[:300]

    probe()
    assert_serving(server)
    assert server.terminate() == 0
    assert "Traceback" not in server.log()


# A dimension value: valid text (sent percent-encoded), or one of the invalid raw forms.
valid_value = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40).filter(
    lambda text: len(text.encode()) <= 128
)
invalid_raw = st.sampled_from(
    [b"%", b"%4", b"%zz", b"%ff", b"%C3%28", b"%00", b"a%0Ab", b"%7F", b"%C2%85", b"x" * 129]
)
dimension = st.one_of(
    valid_value.map(lambda text: (text, quote(text, safe="").encode())),
    invalid_raw.map(lambda raw: (None, raw)),
)
query_plan = st.lists(
    st.tuples(st.sampled_from(["cid", "crid", "aff", "sub", "cb", "utm"]), dimension), max_size=6
)


def expected_key(plan: list[tuple[str, tuple[str | None, bytes]]]) -> tuple[str, ...] | None:
    """The key the rules give a query, or None for a rejected one (the test's own oracle)."""
    values = {"cid": "", "crid": "", "aff": "", "sub": ""}
    seen = set()
    for name, (text, _) in plan:
        if name not in values:
            continue
        if name in seen or text is None:
            return None
        seen.add(name)
        values[name] = text
    return (values["cid"], values["crid"], values["aff"], values["sub"])


async def test_fuzzed_queries_count_exactly_the_valid_ones(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}")
    expected: collections.Counter[tuple[str, ...]] = collections.Counter()

    @FUZZ
    @given(query_plan)
    def probe(plan: list[tuple[str, tuple[str | None, bytes]]]) -> None:
        query = b"&".join(name.encode() + b"=" + raw for name, (_, raw) in plan)
        answer = exchange(
            server.port,
            b"GET /i.gif?"
            + query
            + b" HTTP/1.1\r\nHost: t\r\nUser-Agent: "
            + BROWSER.encode()
            + b"\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
        key = expected_key(plan)
        if key is not None:
            expected[key] += 1

    await asyncio.to_thread(probe)
    assert server.terminate() == 0, server.log()
    stored = {key: counts[0] for key, counts in (await totals_by_key(database)).items()}
    assert stored == dict(expected)


async def test_slow_clients_are_cut_off_and_pixels_keep_being_answered(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--keepalive-timeout=2")
    # 50 connections that send a request head one byte every 0.2 s: bounded to 8 s.
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    head = b"GET /i.gif?cid=slow HTTP/1.1\r\nHost: t\r\nUser-Agent: " + BROWSER.encode()
    closed_at: dict[int, float] = {}
    started = time.monotonic()

    def trickle() -> None:
        for position in range(len(head)):
            if len(closed_at) == len(slow) or time.monotonic() - started > 8:
                return
            for number, connection in enumerate(slow):
                if number in closed_at:
                    continue
                try:
                    connection.sendall(head[position : position + 1])
                except OSError:
                    closed_at[number] = time.monotonic() - started
            time.sleep(0.2)

    trickler = asyncio.create_task(asyncio.to_thread(trickle))
    answered = 0
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as session:
        while not trickler.done():
            async with session.get(f"{server.base_url}/i.gif?cid=normal") as answer:
                assert answer.status == 200
                answered += 1
            await asyncio.sleep(0.05)
    await trickler
    for connection in slow:
        connection.close()
    assert answered > 20
    assert len(closed_at) == len(slow), "every slow connection is cut off"
    assert max(closed_at.values()) < 7
    assert server.terminate() == 0
    stored = {key[0]: counts[0] for key, counts in (await totals_by_key(database)).items()}
    assert stored == {"normal": answered}


async def test_admin_pages_are_not_on_the_public_port(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}/metrics") as answer:
            assert answer.status == 404
        async with session.get(f"{server.admin_url}/metrics") as answer:
            assert answer.status == 200
            assert "pixel_rejected_requests_total" in await answer.text()
    assert server.terminate() == 0


async def test_logs_escape_request_bytes_and_never_show_the_secret(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    secret = "log-secret-0123456789abcdef"
    server = pixel_server(f"--dsn={database}", f"--secret={secret}", "--log-level=DEBUG")
    forged_line = b"\r\n2026-01-01 00:00:00 ERROR forged\x1b[31m"
    await asyncio.to_thread(
        exchange, server.port, b"GET /i.gif?" + forged_line + b" HTTP/1.1\r\n\r\n"
    )
    await asyncio.to_thread(exchange, server.port, b"\x1b[2J\x07 /x HTTP/1.1\r\n\r\n")
    assert server.terminate() == 0
    log = server.log()
    assert secret not in log
    assert "\x1b" not in log and "\x07" not in log
    # Every line is one of the server's own: what a client sent cannot start a line.
    for line in log.splitlines():
        assert re.match(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ", line
        ), line
