"""The HTTP protocol of the pixel port: aiohttp's own, with a fast path for the pixel.

What costs in aiohttp is not reading bytes but what it builds for every request: the parsed
message with its URL and header objects, the request, the handler task, the response and its
writer. So a request of the one shape that makes up nearly all of the traffic, a complete
keep-alive ``GET`` or ``HEAD /i.gif`` over HTTP/1.1 with no body (``_fastcount.GetScanner``
has the exact rules), is read from the received bytes by the compiled scanner, counted from
those bytes by the counter engine, and answered from ``data_received`` with precomputed
bytes, while the connection has nothing else in flight and the client takes its answers
(writing is not paused). No Python object is made per query parameter or header. A client
that does not read its answers gets aiohttp's normal path, whose handler waits for the
answer to drain and whose queue then stops the reading, so it cannot make the server buffer
answers without bound.

Every other byte goes to aiohttp's parser and its normal path, in order: a request of another
shape, one cut across two reads, and every request behind one of those, until the parser is
back between requests. So pipelining, ``Connection: close``, bodies, HTTP/1.0, upgrades and
malformed requests keep aiohttp's exact semantics.

This relies on the internals of aiohttp's ``RequestHandler`` (``_parser``, ``_messages``,
``_waiter``, ``_close``, ``_force_close``, ``_payload_parser``, ``_upgraded``, ``_message_tail``,
``_request_count``, ``_buffer_paused``, ``_max_msg_queue_size``, ``_pause_reading_for_buffer``,
``_next_keepalive_close_time``, ``_keepalive_timeout``): ``data_received`` below feeds the parser
as aiohttp's own does. pyproject.toml pins the aiohttp minor version it was written against,
and the wire tests exercise both paths.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from _fastcount import GIVT_IMPRESSIONS, IMPRESSIONS, GetScanner
from server import givt
from server.app_keys import METRICS
from server.pixel import GIF, PIXEL_HEADERS, count_query, current_bucket

PIXEL_PATH = b"/i.gif"
# aiohttp's limits, where the server sets none.
DEFAULT_MAX_LINE_SIZE = DEFAULT_MAX_FIELD_SIZE = 8190
# The server's own limits. Pixel requests need no more than this: a long request line is an
# attack or a bug (the signed click links are made to fit it).
MAX_LINE_SIZE = 4096
MAX_FIELD_SIZE = 8190


class PixelAnswer:
    """The pixel's answer as bytes, with a Date header renewed once a second."""

    def __init__(self) -> None:
        head = "HTTP/1.1 200 OK\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in PIXEL_HEADERS.items()
        )
        self._head = f"{head}Content-Length: {len(GIF)}\r\nServer: {SERVER_SOFTWARE}\r\n".encode()
        self._second = -1
        self._get = self._head_only = b""

    def bytes(self, head_only: bool, now: float) -> bytes:
        """The answer to a GET, or to a HEAD (``head_only``), at unix time ``now``."""
        second = int(now)
        if second != self._second:
            date = f"Date: {formatdate(second, usegmt=True)}\r\n\r\n".encode()
            self._head_only = self._head + date
            self._get = self._head_only + GIF
            self._second = second
        return self._head_only if head_only else self._get


class ErrorCountingRequestHandler(RequestHandler):
    """aiohttp's request handler, counting the errors it answers itself: a request its parser
    refuses (400), a handler that timed out (504), a fault of the server (500). No handler
    sees those, so without this they would show in no metric."""

    __slots__ = ("_app",)

    def __init__(self, manager: web.Server, *, app: web.Application, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._app = app

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        self._app[METRICS].http_errors[str(status)] += 1
        return super().handle_error(request, status, exc, message)


class PixelRequestHandler(ErrorCountingRequestHandler):
    __slots__ = ("_answer", "_at_boundary", "_scanner")

    def __init__(
        self,
        manager: web.Server,
        *,
        app: web.Application,
        answer: PixelAnswer,
        scanner: GetScanner,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, app=app, **kwargs)
        self._answer = answer
        self._scanner = scanner
        # True while the parser holds no part of a request, so the next byte to arrive starts
        # one: the scanner may read from there.
        self._at_boundary = True

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if (
            self._force_close
            or self._close
            or self._payload_parser is not None
            or self._upgraded
            or parser is None
            or self.transport is None
        ):
            self._at_boundary = False
            super().data_received(data)
            return
        waiter = self._waiter
        if (
            self._at_boundary
            and not self._messages
            and waiter is not None
            and not waiter.done()
            and not self.writing_paused
        ):
            answered = self._answer_pixels(data)
            if answered:
                # An idle connection stays open for the keep-alive timeout after its last
                # request; bytes of a request head not complete yet do not count (slow clients).
                self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
                if answered == len(data):
                    return
                data = data[answered:]
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as error:
            messages = [(_ErrInfo(status=400, exc=error, message=error.message), EMPTY_PAYLOAD)]
            upgraded, tail = False, b""
        for message, payload in messages:
            self._request_count += 1
            self._messages.append((message, payload))
        # The parser is between requests again when the bytes it got end with the empty line
        # of a request that has no body: the last one it returned.
        self._at_boundary = (
            bool(messages)
            and isinstance(messages[-1][0], RawRequestMessage)
            and messages[-1][1] is EMPTY_PAYLOAD
            and not upgraded
            and data.endswith(b"\r\n\r\n")
        )
        if messages and waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._buffer_paused and len(self._messages) >= self._max_msg_queue_size:
            self._pause_reading_for_buffer()
        self._upgraded = upgraded
        if upgraded and tail:
            self._message_tail = tail

    def _answer_pixels(self, data: bytes) -> int:
        """Counts and answers the pixel requests at the start of ``data``, in one write;
        returns where the bytes they do not take begin."""
        app, scan = self._app, self._scanner.scan
        # One clock reading for the requests of one read: they arrived together.
        now = time.time()
        bucket = current_bucket(app, now)
        answers = []
        end = 0
        while (request := scan(data, end)) is not None:
            end, head_only, query_start, query_end, user_agent = request
            if not head_only:
                reason = givt.classify_user_agent(user_agent)
                count_query(
                    app, bucket, data, query_start, query_end, reason, IMPRESSIONS, GIVT_IMPRESSIONS
                )
            answers.append(self._answer.bytes(head_only, now))
        if answers:
            app[METRICS].requests["/i.gif"] += len(answers)
            assert self.transport is not None
            self.transport.write(answers[0] if len(answers) == 1 else b"".join(answers))
        return end


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
    scanner = GetScanner(
        PIXEL_PATH,
        handler_args.get("max_line_size", DEFAULT_MAX_LINE_SIZE),
        handler_args.get("max_field_size", DEFAULT_MAX_FIELD_SIZE),
    )

    def handler() -> RequestHandler:
        if handler_args.get("access_log") is not None:
            return ErrorCountingRequestHandler(server, app=runner.app, loop=loop, **handler_args)
        return PixelRequestHandler(
            server, app=runner.app, answer=answer, scanner=scanner, loop=loop, **handler_args
        )

    return await loop.create_server(handler, host, port, backlog=4096, reuse_port=reuse_port)
