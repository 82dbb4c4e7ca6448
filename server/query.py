"""Parsing and validation of the pixel query string.

The dimensions (``cid``, ``crid``, ``aff``, ``sub``) are percent-decoded UTF-8 of at most
:data:`MAX_VALUE_BYTES` bytes with no control characters. Anything else makes the request
*rejected*: it is still answered with the GIF, and counted by reason instead of as an event.
Unknown parameters, and the cache-buster ``cb``, are ignored.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from _fastcount import QUERY_PARAMETERS

MAX_VALUE_BYTES = 128

# Query parameter -> position in Dimensions.
_DIMENSION_PARAMS = {name: position for position, name in enumerate(QUERY_PARAMETERS)}

# C0 controls, DEL and C1 controls.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class Dimensions(NamedTuple):
    campaign: str
    creative: str
    affiliate: str
    sub_id: str


class Rejected(Exception):
    """The query string is invalid; ``reason`` is the label it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The reasons, as counted in the `rejected` metric.
BAD_PERCENT_ENCODING = "bad_percent_encoding"
INVALID_UTF8 = "invalid_utf8"
VALUE_TOO_LONG = "value_too_long"
CONTROL_CHARACTER = "control_character"
REPEATED_PARAMETER = "repeated_parameter"


def _unquote(raw: bytes) -> bytes:
    """Strict form decoding: ``+`` is a space, and every ``%`` has two hex digits after it."""
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    if _BAD_PERCENT.search(raw):
        raise Rejected(BAD_PERCENT_ENCODING)
    head, *rest = raw.split(b"%")
    return head + b"".join(bytes.fromhex(part[:2].decode("ascii")) + part[2:] for part in rest)


def decode_value(raw: bytes, max_bytes: int = MAX_VALUE_BYTES) -> str:
    """Decodes one raw parameter value: strict percent-decoding, UTF-8, at most ``max_bytes``
    decoded bytes, no control characters; raises :class:`Rejected` otherwise."""
    data = _unquote(raw)
    if len(data) > max_bytes:
        raise Rejected(VALUE_TOO_LONG)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(INVALID_UTF8) from None
    if _CONTROL.search(text):
        raise Rejected(CONTROL_CHARACTER)
    return text


def check_value(text: str, max_bytes: int = MAX_VALUE_BYTES) -> str:
    """The same rules for a value given as text (on the command line, say)."""
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise Rejected(VALUE_TOO_LONG)
    if _CONTROL.search(text):
        raise Rejected(CONTROL_CHARACTER)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(INVALID_UTF8) from None
    return text


def parse_dimensions(query: bytes) -> Dimensions:
    """Returns the dimensions of a raw query string (the bytes after ``?``, as received).

    >>> parse_dimensions(b"cid=summer&crid=banner%2D1&cb=8812")
    Dimensions(campaign='summer', creative='banner-1', affiliate='', sub_id='')

    Raises :class:`Rejected` with the reason when a dimension is invalid or repeated.
    """
    if _PLAIN(query):
        return _parse_plain(query)
    values = ["", "", "", ""]
    seen = 0
    for pair in query.split(b"&"):
        name, _, raw = pair.partition(b"=")
        position = _DIMENSION_PARAMS.get(name.decode("latin-1"))
        if position is None and b"%" in name:
            try:
                position = _DIMENSION_PARAMS.get(decode_value(name))
            except Rejected:
                continue  # an unknown parameter, however badly encoded, is ignored
        if position is None:
            continue
        if seen & (1 << position):
            raise Rejected(REPEATED_PARAMETER)
        seen |= 1 << position
        values[position] = decode_value(raw)
    return Dimensions(*values)


# The common case: printable ASCII with nothing to decode (no "%", "+", control or non-ASCII
# byte), so every value is its own text, parsed without the general decoder. (The pixel counts
# such a query in the counter engine, Counters.add_query, without parsing it here, unless a
# parameter repeats or a value is too long; clicks and the viewability beacon parse it here.)
_PLAIN = re.compile(rb"[!-$&-*,-~]*").fullmatch
_PLAIN_PARAMS = {name.encode(): position for name, position in _DIMENSION_PARAMS.items()}


def _parse_plain(query: bytes) -> Dimensions:
    values = ["", "", "", ""]
    seen = 0
    for pair in query.split(b"&"):
        name, _, raw = pair.partition(b"=")
        position = _PLAIN_PARAMS.get(name)
        if position is None:
            continue
        if seen & (1 << position):
            raise Rejected(REPEATED_PARAMETER)
        seen |= 1 << position
        if len(raw) > MAX_VALUE_BYTES:
            raise Rejected(VALUE_TOO_LONG)
        values[position] = raw.decode("ascii")
    return Dimensions(*values)
