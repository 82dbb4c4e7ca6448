"""Pure-Python request scanner: the reference the compiled one must match.

A :class:`GetScanner` finds, at an offset of the bytes a connection received, one complete
request of the single shape a server may answer without its HTTP parser: a ``GET`` or ``HEAD``
of one path, HTTP/1.1, keep-alive, no body. The shape is a strict subset of HTTP/1.1, so that
the parser would read the same request the same way:

- the request line is ``GET`` or ``HEAD``, one space, the path, optionally ``?`` and a query,
  one space, ``HTTP/1.1``, CRLF; the query holds only the characters RFC 3986 allows in one
  (letters, digits, ``-._~!$&'()*+,;=:@/?%``), and the target is shorter than
  ``max_line_size``;
- each header line is a token, ``:``, optional spaces or tabs, a value of printable ASCII,
  spaces and tabs, CRLF, and is shorter than half of ``max_field_size`` (aiohttp's parser
  counts a name with the value after it, and at times with the name before it); at most
  :data:`MAX_HEADERS` headers; an empty line ends them;
- exactly one ``Host`` (HTTP/1.1 requires it) and at most one ``User-Agent``;
- no header that gives the request a body or describes one (``Transfer-Encoding``, any
  ``Content-*``), ends or upgrades the connection (``Connection`` other than ``keep-alive``,
  ``Proxy-Connection``, ``Upgrade``, ``Sec-WebSocket-Key1``), asks something of the server
  (``Expect``, ``Max-Forwards``), marks a prefetch (``Purpose``, ``Sec-Purpose``, ``X-Moz``),
  or belongs to answers (``ETag``, ``Server``).

Anything else, an incomplete request included, is not that shape: the caller hands the bytes
from that offset on to its HTTP parser.
"""

from __future__ import annotations

import re
from typing import Final, final

from ._counters_py import _int64

__all__ = ("MAX_HEADERS", "GetScanner")

MAX_HEADERS: Final = 100

# (end, head_only, query_start, query_end, user_agent)
Scanned = tuple[int, bool, int, int, str]

_QUERY: Final = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
_TOKEN: Final = re.compile(rb"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
_FIELD_VALUE: Final = re.compile(rb"[ \t!-~]*")
_SPACES: Final = re.compile(rb"[ \t]*")
_VERSION: Final = b" HTTP/1.1\r\n"
# Headers that take a request out of the shape, lower case; and any Content-*.
_REFUSED: Final = frozenset(
    {
        b"transfer-encoding",
        b"proxy-connection",
        b"upgrade",
        b"sec-websocket-key1",
        b"expect",
        b"max-forwards",
        b"purpose",
        b"sec-purpose",
        b"x-moz",
        b"etag",
        b"server",
    }
)


@final
class GetScanner:
    """Scans for complete GET and HEAD requests of ``path`` (see the module)."""

    __slots__ = ("_max_field_size", "_max_line_size", "_path")

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError(f"type '{cls.__mro__[1].__qualname__}' is not an acceptable base type")

    def __init__(self, path: bytes, max_line_size: int, max_field_size: int) -> None:
        if type(path) is not bytes:
            raise TypeError(
                f"Argument 'path' has incorrect type (expected bytes, got {type(path).__name__})"
            )
        self._path = path
        self._max_line_size = _int64(max_line_size, "ssize_t")
        self._max_field_size = _int64(max_field_size, "ssize_t")

    def scan(self, data: bytes, start: int) -> Scanned | None:
        """``(end, head_only, query_start, query_end, user_agent)`` for the request of the
        shape that starts at ``data[start]`` and ends before ``data[end]``, or ``None``.

        The query string is ``data[query_start:query_end]``, empty when there is none;
        ``user_agent`` is the User-Agent without the spaces around it, ``""`` when there is
        none.
        """
        if type(data) is not bytes:
            raise TypeError(
                f"Argument 'data' has incorrect type (expected bytes, got {type(data).__name__})"
            )
        start = _int64(start, "ssize_t")
        if not 0 <= start <= len(data):
            raise ValueError(f"start {start} is not in data of {len(data)} bytes")
        if data.startswith(b"GET ", start):
            head_only, at = False, start + 4
        elif data.startswith(b"HEAD ", start):
            head_only, at = True, start + 5
        else:
            return None
        target = at
        if not data.startswith(self._path, at):
            return None
        at += len(self._path)
        query_start = query_end = at
        if data.startswith(b"?", at):
            query_start = at + 1
            query_end = _match_end(_QUERY, data, query_start)
            at = query_end
        if at - target >= self._max_line_size or not data.startswith(_VERSION, at):
            return None
        at += len(_VERSION)
        user_agent: str | None = None
        hosts = headers = 0
        while not data.startswith(b"\r\n", at):
            headers += 1
            if headers > MAX_HEADERS:
                return None
            name = _TOKEN.match(data, at)
            if name is None or not data.startswith(b":", name.end()):
                return None
            value = _match_end(_SPACES, data, name.end() + 1)
            line_end = _match_end(_FIELD_VALUE, data, value)
            if not data.startswith(b"\r\n", line_end):
                return None
            if line_end - at >= self._max_field_size // 2:
                return None
            text = data[value:line_end].rstrip(b" \t")
            field = name.group().lower()
            if field in _REFUSED or field.startswith(b"content-"):
                return None
            if field == b"host":
                hosts += 1
                if hosts > 1:
                    return None
            if field == b"connection" and text.lower() != b"keep-alive":
                return None
            if field == b"user-agent":
                if user_agent is not None:
                    return None
                user_agent = text.decode("ascii")
            at = line_end + 2
        if not hosts:
            return None
        return at + 2, head_only, query_start, query_end, user_agent or ""


def _match_end(pattern: re.Pattern[bytes], data: bytes, at: int) -> int:
    match = pattern.match(data, at)
    assert match is not None  # the patterns match the empty string
    return match.end()
