"""The request scanner of the pixel's fast path: every case runs against the compiled and the
pure-Python module, and every request it takes, aiohttp's own parser reads the same way."""

from __future__ import annotations

import asyncio
import importlib
import random
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD

import _fastcount
import _fastcount._http_py

LIMITS = (4096, 8190)  # the server's max_line_size and max_field_size
UA = b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"
PIXEL = (
    b"GET /i.gif?cid=c1&crid=cr1&aff=a1&sub=s1&cb=123 HTTP/1.1\r\nHost: t\r\nUser-Agent: %s\r\n\r\n"
)


@pytest.fixture(params=["c", "py"], ids=["compiled", "pure-python"])
def http_impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "c":
        if _fastcount.NO_EXTENSIONS:
            pytest.skip("FASTCOUNT_NO_EXTENSIONS is set")
        return importlib.import_module("_fastcount._http_c")
    return _fastcount._http_py


def scanner(impl: ModuleType) -> Any:
    return impl.GetScanner(b"/i.gif", *LIMITS)


def test_a_pixel_request_and_the_one_behind_it(http_impl: ModuleType) -> None:
    first = PIXEL % UA
    second = (
        b"HEAD /i.gif HTTP/1.1\r\nconnection: Keep-Alive\r\nuser-agent:\t a b \t\r\nHOST: t\r\n\r\n"
    )
    data = first + second
    scan = scanner(http_impl).scan
    query = data.index(b"cid")
    assert scan(data, 0) == (len(first), False, query, data.index(b" HTTP"), UA.decode())
    assert scan(data, len(first)) == (len(data), True, len(first) + 11, len(first) + 11, "a b")
    assert scan(data, len(data)) is None


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif? HTTP/1.1\r\nX: \r\nHost:\r\n\r\n",
        b"GET /i.gif?a=%2F+b&c=:@/?!$'()*,;~._- HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nX-Token!#$%&'*+-.^_`|~: v\r\nhost: t\r\n\r\n",
    ],
)
def test_shapes_taken(http_impl: ModuleType, request_bytes: bytes) -> None:
    scanned = scanner(http_impl).scan(request_bytes, 0)
    assert scanned is not None and scanned[0] == len(request_bytes)
    assert scanned[4] == ""


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /i.gif HTTP/1.1\r\nHost: t\r\n\r\n",
        b"get /i.gif HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif HTTP/1.0\r\nHost: t\r\n\r\n",
        b"GET /i.gif HTTP/1.1\n\n",
        b"GET  /i.gif HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gifx HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif/ HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /I.GIF HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET http://t/i.gif HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif?a#fragment HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif?a=<b> HTTP/1.1\r\nHost: t\r\n\r\n",
        b'GET /i.gif?a="b" HTTP/1.1\r\nHost: t\r\n\r\n',
        b"GET /i.gif?a=\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif?a=\x00 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, Upgrade\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nProxy-Connection: close\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nSec-Purpose: prefetch\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nPurpose: prefetch\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nX-Moz: prefetch\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nUser-Agent: a\r\nUser-Agent: b\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost : t\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nX: y\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nHost: t\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nContent-: x\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nServer: x\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nETag: x\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nMax-Forwards: 1\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nSec-WebSocket-Key1: x\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\n: t\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\nX: y\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nUser-Agent: caf\xc3\xa9\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nX: a\x7fb\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        b"GET /i.gif?" + b"a" * 4089 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\n" + b"X" * 4093 + b": \r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\nX: " + b"y" * 4092 + b"\r\n\r\n",
    ],
)
def test_shapes_left_to_the_parser(http_impl: ModuleType, request_bytes: bytes) -> None:
    assert scanner(http_impl).scan(request_bytes, 0) is None


def test_the_longest_requests_taken_are_within_the_parsers_limits(http_impl: ModuleType) -> None:
    line = b" HTTP/1.1\r\nHost: t\r\n"
    longest_target = b"GET /i.gif?" + b"a" * 4088 + line + b"\r\n"
    longest_field = b"GET /i.gif" + line + b"X" * 2000 + b": " + b"y" * 2092 + b"\r\n\r\n"
    hundred_headers = b"GET /i.gif" + line + b"X: y\r\n" * 99 + b"\r\n"
    for data in (longest_target, longest_field, hundred_headers):
        assert scanner(http_impl).scan(data, 0) is not None
        assert len(aiohttp_reads(data)) == 1


def test_an_incomplete_request_is_left_whole(http_impl: ModuleType) -> None:
    data = PIXEL % UA
    scan = scanner(http_impl).scan
    for end in range(len(data)):
        assert scan(data[:end], 0) is None, data[:end]


def test_bad_arguments(http_impl: ModuleType) -> None:
    scan = scanner(http_impl).scan
    with pytest.raises(ValueError):
        scan(b"GET", 4)
    with pytest.raises(ValueError):
        scan(b"GET", -1)
    with pytest.raises(TypeError):
        scan("GET /i.gif HTTP/1.1\r\nHost: t\r\n\r\n", 0)
    with pytest.raises(TypeError):
        http_impl.GetScanner("/i.gif", *LIMITS)


def mutations(seed: int, count: int) -> list[bytes]:
    """Pixel requests with random bytes replaced, inserted or deleted, plus some whole ones."""
    rng = random.Random(seed)
    bases = [
        PIXEL % UA,
        b"HEAD /i.gif?cid=x%20y+z HTTP/1.1\r\nConnection: keep-alive\r\nUser-Agent:  ua \r\n"
        b"Host: t\r\n\r\n",
        b"GET /i.gif HTTP/1.1\r\nHost: t\r\n\r\nGET /i.gif?cid=b HTTP/1.1\r\nHost: t\r\n\r\n",
    ]
    alphabet = b" \t\r\n:?=&%#/+-\x00\x7f\x80\xffaAgGiI1"
    found = []
    for _ in range(count):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(data) + 1)
            action = rng.randrange(3)
            if action == 0 and at < len(data):
                data[at] = rng.choice(alphabet)
            elif action == 1:
                data.insert(at, rng.choice(alphabet))
            elif at < len(data):
                del data[at]
        found.append(bytes(data))
    return found


@pytest.mark.skipif(_fastcount.NO_EXTENSIONS, reason="FASTCOUNT_NO_EXTENSIONS is set")
def test_compiled_and_pure_python_agree() -> None:
    compiled = scanner(importlib.import_module("_fastcount._http_c")).scan
    pure = scanner(_fastcount._http_py).scan
    taken = 0
    for data in mutations(seed=5, count=20_000):
        for start in (0, data.find(b"GET", 1)):
            if start >= 0:
                assert compiled(data, start) == pure(data, start), (data, start)
                taken += compiled(data, start) is not None
    assert taken > 1000  # the corpus holds requests of the shape, not only broken ones


def aiohttp_reads(data: bytes) -> list[tuple[Any, Any]]:
    """The messages aiohttp's parser, as the server sets it up, reads in ``data``, which must
    be all of them: nothing left over, no upgrade."""
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(
            mock.Mock(), loop, 2**16, max_line_size=LIMITS[0], max_field_size=LIMITS[1]
        )
        messages, upgraded, tail = parser.feed_data(data)
    finally:
        loop.close()
    assert not upgraded and not tail, data
    return list(messages)


def test_aiohttp_reads_every_request_taken_the_same_way(http_impl: ModuleType) -> None:
    """What the scanner takes is one complete request to aiohttp's parser too: same method,
    target and User-Agent, HTTP/1.1, keep-alive, no body."""
    scan = scanner(http_impl).scan
    taken = 0
    for data in mutations(seed=11, count=3000):
        scanned = scan(data, 0)
        if scanned is None:
            continue
        taken += 1
        end, head_only, query_start, query_end, user_agent = scanned
        ((message, payload),) = aiohttp_reads(data[:end])
        assert message.method == ("HEAD" if head_only else "GET")
        _, target, _ = data[: data.index(b"\r\n")].split(b" ")
        assert message.path == target.decode(), data
        assert target.partition(b"?")[::2] == (b"/i.gif", data[query_start:query_end]), data
        assert message.version == (1, 1) and not message.should_close, data
        assert not message.upgrade and payload is EMPTY_PAYLOAD, data
        assert message.headers.get("User-Agent", "").strip() == user_agent, data
    assert taken > 100
