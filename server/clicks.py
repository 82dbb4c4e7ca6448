"""Signed click links: ``/c`` redirects only where the server itself signed the destination.

A link carries the dimensions, the destination ``to``, an expiry ``exp`` (unix seconds) and
``sig``: the HMAC-SHA256 of the canonical form of all of them under the server's secret,
base64url without padding. The server accepts any of its secrets (the first signs), so a secret
can be rotated without breaking the links already out. Anything else is answered 400 with a
short page and no ``Location``, and counted as rejected: the server is never an open redirect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from urllib.parse import quote, urlencode, urlsplit

from aiohttp import web
from yarl import URL

from _fastcount import CLICKS, GIVT_CLICKS
from server.app_keys import CONFIG, METRICS
from server.pixel import raw_query, record, reject
from server.protocol import MAX_LINE_SIZE
from server.query import (
    REPEATED_PARAMETER,
    Dimensions,
    Rejected,
    decode_value,
    parse_dimensions,
)

MAX_DESTINATION_BYTES = 2048

# The reasons, as counted in the `rejected` metric.
CLICKS_DISABLED = "clicks_disabled"
MISSING_SIGNATURE = "missing_signature"
BAD_SIGNATURE = "bad_signature"
BAD_EXPIRY = "bad_expiry"
EXPIRED = "expired"
BAD_DESTINATION = "bad_destination"

INVALID_LINK_PAGE = (
    b"<!doctype html><html lang=en><meta charset=utf-8><title>Link not valid</title>"
    b"<p>This link is not valid or has expired.</p></html>\n"
)


def canonical(dimensions: Dimensions, to: str, expires: int) -> bytes:
    """What a signature covers: version, dimensions, destination, expiry; one per line (no
    value may hold a control character, so the lines cannot be confused)."""
    return "\n".join(("v1", *dimensions, to, str(expires))).encode()


def signature(secret: str, dimensions: Dimensions, to: str, expires: int) -> str:
    digest = hmac.new(secret.encode(), canonical(dimensions, to, expires), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify(secrets: Sequence[str], dimensions: Dimensions, to: str, expires: int, sig: str) -> bool:
    """Constant-time check against every accepted secret."""
    valid = False
    for secret in secrets:
        expected = signature(secret, dimensions, to, expires)
        valid |= hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace"))
    return valid


def click_url(base_url: str, secret: str, dimensions: Dimensions, to: str, expires: int) -> str:
    """A signed click link on ``base_url`` (the public address of the pixel server); a
    ValueError if the server could not take its request line.

    >>> click_url("https://px.example", "0123456789abcdef", Dimensions("c", "cr", "a", "s"),
    ...           "https://shop.example/p?id=1", 1900000000)  # doctest: +ELLIPSIS
    'https://px.example/c?cid=c&crid=cr&aff=a&sub=s&to=https%3A%2F%2Fshop.example%2Fp%3Fid%3D1&exp=1900000000&sig=...'
    """
    check_destination(to)
    params = {
        "cid": dimensions.campaign,
        "crid": dimensions.creative,
        "aff": dimensions.affiliate,
        "sub": dimensions.sub_id,
        "to": to,
        "exp": str(expires),
        "sig": signature(secret, dimensions, to, expires),
    }
    query = urlencode(params, quote_via=quote)
    # aiohttp's parsers limit the request line (pure Python) or its target (compiled): the
    # whole line is held to the limit, so the link works with either.
    request_line = f"GET {urlsplit(base_url).path.rstrip('/')}/c?{query} HTTP/1.1"
    if len(request_line) > MAX_LINE_SIZE:
        raise ValueError(
            f"the link would make a request line of {len(request_line)} bytes, and the server"
            f" takes {MAX_LINE_SIZE} at most: shorten the destination (percent-encoded, it"
            f" takes {len(quote(to, safe=''))})"
        )
    return f"{base_url.rstrip('/')}/c?{query}"


def check_destination(to: str) -> URL:
    """An absolute http(s) URL with a host, or :class:`Rejected` (``bad_destination``)."""
    try:
        url = URL(to)
        host = url.host  # a host IDNA cannot encode raises here
    except ValueError:
        raise Rejected(BAD_DESTINATION) from None
    if url.scheme not in ("http", "https") or not host or any(c in to for c in " \\"):
        raise Rejected(BAD_DESTINATION)
    return url


def click_params(query: bytes) -> tuple[str, int, str]:
    """``to``, ``exp`` and ``sig`` of a raw click query string; each at most once."""
    found: dict[bytes, bytes] = {}
    for pair in query.split(b"&"):
        name, _, raw = pair.partition(b"=")
        if name in (b"to", b"exp", b"sig"):
            if name in found:
                raise Rejected(REPEATED_PARAMETER)
            found[name] = raw
    if not found.get(b"sig"):
        raise Rejected(MISSING_SIGNATURE)
    to = decode_value(found.get(b"to", b""), MAX_DESTINATION_BYTES)
    raw_expiry = found.get(b"exp", b"")
    # Digits as click_url writes them, no other spelling of the number (+T, 0T, T_000): one
    # link per signature.
    if not raw_expiry.isdigit() or str(expires := int(raw_expiry)).encode() != raw_expiry:
        raise Rejected(BAD_EXPIRY)
    return to, expires, decode_value(found[b"sig"])


def destination(secrets: Sequence[str], dimensions: Dimensions, query: bytes, now: float) -> str:
    """The checked destination of a click, or :class:`Rejected` with the reason: the signed
    string itself, so that a destination that checks its own query (a deep link signed by
    the shop) gets it byte for byte; only one that is not ASCII is encoded (IDNA for its
    host, percent-encoding for the rest), as a Location header must be."""
    if not secrets:
        raise Rejected(CLICKS_DISABLED)
    to, expires, sig = click_params(query)
    if not verify(secrets, dimensions, to, expires, sig):
        raise Rejected(BAD_SIGNATURE)
    if expires <= now:
        raise Rejected(EXPIRED)
    url = check_destination(to)
    return to if to.isascii() else str(url)


async def click(request: web.Request) -> web.Response:
    """``GET /c``: one click, then 302 to the signed destination; 400 for anything else.

    Clicks from bots and prefetches are redirected too (so detection is not revealed), and
    counted in ``givt_clicks``. ``HEAD`` gets the same answer and counts nothing.
    """
    request.app[METRICS].requests["/c"] += 1
    query = raw_query(request)
    try:
        dimensions = parse_dimensions(query)
        location = destination(request.app[CONFIG].secret, dimensions, query, time.time())
    except Rejected as rejected:
        if request.method == "GET":
            reject(request, rejected)
        return web.Response(
            status=400,
            body=INVALID_LINK_PAGE,
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )
    if request.method == "GET":
        record(request, dimensions, CLICKS, GIVT_CLICKS)
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
