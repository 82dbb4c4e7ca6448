"""Parsing the pixel query string: what is a dimension, what is rejected and why."""

from __future__ import annotations

import pytest

from server.query import MAX_VALUE_BYTES, Dimensions, Rejected, parse_dimensions


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"cid=c&crid=cr&aff=a&sub=s&cb=1", Dimensions("c", "cr", "a", "s")),
        (b"", Dimensions("", "", "", "")),
        (b"cb=99&unknown=%zz&x", Dimensions("", "", "", "")),
        (b"sub=s&cid=c", Dimensions("c", "", "", "s")),
        (b"cid=a+b%20c", Dimensions("a b c", "", "", "")),
        (b"cid=%E2%82%AC%2B", Dimensions("\u20ac+", "", "", "")),
        (b"cid=caf\xc3\xa9", Dimensions("caf\u00e9", "", "", "")),
        (b"c%69d=encoded-name", Dimensions("encoded-name", "", "", "")),
        (b"cid", Dimensions("", "", "", "")),
        (b"cid=" + b"x" * MAX_VALUE_BYTES, Dimensions("x" * MAX_VALUE_BYTES, "", "", "")),
        (b"cid=a=b", Dimensions("a=b", "", "", "")),
    ],
)
def test_valid(query: bytes, expected: Dimensions) -> None:
    assert parse_dimensions(query) == expected


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        (b"cid=" + b"x" * (MAX_VALUE_BYTES + 1), "value_too_long"),
        (b"cid=" + b"%C3%A9" * 65, "value_too_long"),
        (b"cid=%0D%0Aset-cookie", "control_character"),
        (b"aff=\x01", "control_character"),
        (b"sub=%C2%9F", "control_character"),
        (b"cid=%", "bad_percent_encoding"),
        (b"cid=%g0", "bad_percent_encoding"),
        (b"crid=%FF", "invalid_utf8"),
        (b"crid=\xed\xa0\x80", "invalid_utf8"),
        (b"cid=a&crid=b&cid=a", "repeated_parameter"),
        (b"cid=a&c%69d=b", "repeated_parameter"),
    ],
)
def test_rejected(query: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as raised:
        parse_dimensions(query)
    assert raised.value.reason == reason
