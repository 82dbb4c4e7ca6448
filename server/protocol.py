"""The HTTP protocol of the pixel port: aiohttp's own, with a fast path for the pixel.

aiohttp's C parser is cheap; what costs is the request object, the handler task, the response
object and its writer that aiohttp builds for every request. Measured on one core (wrk -t1 -c64,
keep-alive), a `web.Server` answering a GIF serves about 37k requests/s, and answering simple
pixel requests straight from ``data_received`` with precomputed bytes about 96k/s. So the parser
runs as usual, and each parsed message that is a plain ``GET``/``HEAD /i.gif`` (HTTP/1.1,
keep-alive, no body, no upgrade) is answered right there, while the connection has nothing else
in flight. Every other message, and every message behind one that is not simple, goes to
aiohttp's normal path in order, so pipelining, ``Connection: close``, bodies, HTTP/1.0 and
errors keep their exact semantics.

This relies on the internals of aiohttp's ``RequestHandler`` (``_parser``, ``_messages``,
``_waiter``); pyproject.toml pins the aiohttp minor version it was written against, and the wire
tests exercise both paths.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from _fastcount import GIVT_IMPRESSIONS, IMPRESSIONS
from server.app_keys import METRICS
from server.pixel import GIF, PIXEL_HEADERS, count_query


class PixelAnswer:
    """The pixel's answer as bytes, with a Date header renewed once a second."""

    def __init__(self) -> None:
        head = "HTTP/1.1 200 OK\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in PIXEL_HEADERS.items()
        )
        self._head = f"{head}Content-Length: {len(GIF)}\r\nServer: {SERVER_SOFTWARE}\r\n".encode()
        self._second = -1
        self._get = self._head_only = b""

    def bytes(self, head_only: bool) -> bytes:
        now = int(time.time())
        if now != self._second:
            date = f"Date: {formatdate(now, usegmt=True)}\r\n\r\n".encode()
            self._head_only = self._head + date
            self._get = self._head_only + GIF
            self._second = now
        return self._head_only if head_only else self._get


def _simple_pixel(message: Any, payload: Any) -> bool:
    """A message the fast path answers: GET or HEAD of /i.gif, HTTP/1.1 keep-alive, no body."""
    return (
        isinstance(message, RawRequestMessage)
        and payload is EMPTY_PAYLOAD
        and message.method in ("GET", "HEAD")
        and message.version == HttpVersion11
        and not message.should_close
        and not message.upgrade
        and (message.path == "/i.gif" or message.path.startswith("/i.gif?"))
    )


class PixelRequestHandler(RequestHandler):
    __slots__ = ("_answer", "_app")

    def __init__(
        self, manager: web.Server, *, app: web.Application, answer: PixelAnswer, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._app = app
        self._answer = answer

    def data_received(self, data: bytes) -> None:
        waiter, parser, transport = self._waiter, self._parser, self.transport
        if (
            waiter is None
            or waiter.done()
            or self._messages
            or parser is None
            or transport is None
            or self._force_close
            or self._close
            or self._payload_parser is not None
            or self._upgraded
        ):
            super().data_received(data)
            return
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as error:
            messages = [(_ErrInfo(status=400, exc=error, message=error.message), EMPTY_PAYLOAD)]
            upgraded, tail = False, b""
        answered = False
        for message, payload in messages:
            if not self._messages and _simple_pixel(message, payload):
                answered = True
                self._app[METRICS].requests["/i.gif"] += 1
                parser.message_consumed()
                head_only = message.method == "HEAD"
                if not head_only:
                    query = message.path.partition("?")[2].encode("utf-8", "surrogateescape")
                    count_query(self._app, query, message.headers, IMPRESSIONS, GIVT_IMPRESSIONS)
                transport.write(self._answer.bytes(head_only))
            else:
                self._request_count += 1
                self._messages.append((message, payload))
        if self._messages:
            waiter.set_result(None)
            if not self._buffer_paused and len(self._messages) >= self._max_msg_queue_size:
                self._pause_reading_for_buffer()
        elif answered:
            # An idle connection stays open for the keep-alive timeout after its last request;
            # bytes of a request head that is not complete yet do not count (slow clients).
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        self._upgraded = upgraded
        if upgraded and tail:
            self._message_tail = tail


async def listen(
    runner: web.AppRunner, host: str, port: int, *, reuse_port: bool, **handler_args: Any
) -> asyncio.Server:
    """Serves the runner's app on ``host:port`` with :class:`PixelRequestHandler`.

    ``handler_args`` are those the runner was given for its request handlers. With an access
    log, every request takes aiohttp's normal path, which is the one that logs.
    """
    loop = asyncio.get_running_loop()
    server = runner.server
    assert server is not None, "runner.setup() first"
    answer = PixelAnswer()

    def handler() -> RequestHandler:
        if handler_args.get("access_log") is not None:
            return server()
        return PixelRequestHandler(server, app=runner.app, answer=answer, loop=loop, **handler_args)

    return await loop.create_server(handler, host, port, backlog=4096, reuse_port=reuse_port)
