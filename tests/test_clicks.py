"""Signed clicks: 302 only to the destination the server signed, 400 and no Location else."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from loadtests.processes import PIXEL_SERVER
from server import clicks
from server.protocol import MAX_LINE_SIZE
from server.query import Dimensions, Rejected
from tests.harness import PixelServer, metric, scrape, totals_by_key

SECRET = "test-secret-0123456789"
OLD_SECRET = "old-secret-9876543210"
BROWSER = {"User-Agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0 Safari/537.36"}
DIMENSIONS = Dimensions("spring", "banner-1", "partner-7", "top")
SHOP = "https://shop.example/p?id=1&ref=px"


def link(
    server: PixelServer,
    secret: str = SECRET,
    to: str = SHOP,
    expires: int | None = None,
    dimensions: Dimensions = DIMENSIONS,
) -> str:
    expires = int(time.time()) + 3600 if expires is None else expires
    return clicks.click_url(server.base_url, secret, dimensions, to, expires)


def forged(server: PixelServer, to: str, secret: str = SECRET) -> str:
    """A link whose signature is right but whose destination click_url would refuse."""
    expires = int(time.time()) + 3600
    sig = clicks.signature(secret, DIMENSIONS, to, expires)
    return (
        f"{server.base_url}/c?cid=spring&crid=banner-1&aff=partner-7&sub=top"
        f"&to={quote(to, safe='')}&exp={expires}&sig={sig}"
    )


async def get(url: str, headers: dict[str, str] = BROWSER) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(URL(url, encoded=True), allow_redirects=False) as answer,
    ):
        return answer.status, dict(answer.headers), await answer.read()


def test_signature_covers_every_field_and_rotation_accepts_listed_secrets() -> None:
    sig = clicks.signature(SECRET, DIMENSIONS, SHOP, 2_000_000_000)
    assert clicks.verify([SECRET], DIMENSIONS, SHOP, 2_000_000_000, sig)
    assert clicks.verify(["other-secret-000000000", SECRET], DIMENSIONS, SHOP, 2_000_000_000, sig)
    assert not clicks.verify([OLD_SECRET], DIMENSIONS, SHOP, 2_000_000_000, sig)
    assert not clicks.verify([SECRET], DIMENSIONS, SHOP, 2_000_000_001, sig)
    assert not clicks.verify([SECRET], DIMENSIONS, SHOP + "x", 2_000_000_000, sig)
    shifted = Dimensions("springb", "anner-1", "partner-7", "top")
    assert not clicks.verify([SECRET], shifted, SHOP, 2_000_000_000, sig)


@pytest.mark.parametrize(
    "to",
    [
        "javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "ftp://files.example/x",
        "//evil.example/path",
        "/relative/path",
        "https:///no-host",
        "https://evil.example\\@shop.example/",
        "https://shop.example/a b",
        "https://xn--/",  # a host IDNA cannot encode
    ],
)
def test_only_absolute_http_urls_are_destinations(to: str) -> None:
    with pytest.raises(Rejected) as raised:
        clicks.check_destination(to)
    assert raised.value.reason == "bad_destination"


async def test_valid_click_redirects_and_counts(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", f"--secret={SECRET}")
    status, headers, _ = await get(link(server))
    assert status == 302
    assert headers["Location"] == SHOP
    assert headers["Cache-Control"] == "no-store"
    googlebot = {
        "User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    }
    status, headers, _ = await get(link(server), googlebot)
    assert (status, headers["Location"]) == (302, SHOP)  # bots are redirected too
    status, headers, _ = await get(link(server), {**BROWSER, "Sec-Purpose": "prefetch"})
    assert (status, headers["Location"]) == (302, SHOP)
    async with (
        aiohttp.ClientSession(headers=BROWSER) as session,
        session.head(link(server), allow_redirects=False) as answer,
    ):
        assert answer.status == 302  # HEAD counts nothing
    assert server.terminate() == 0, server.log()
    totals = await totals_by_key(database)
    assert totals == {DIMENSIONS: (0, 0, 0, 0, 1, 2)}


async def test_a_link_signed_with_a_rotated_out_secret_still_works_while_listed(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", f"--secret={SECRET},{OLD_SECRET}")
    assert (await get(link(server, secret=OLD_SECRET)))[0] == 302
    assert (await get(link(server, secret="never-listed-secret-00")))[0] == 400
    assert server.terminate() == 0


async def test_invalid_links_get_400_a_short_page_and_no_redirect(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", f"--secret={SECRET}")
    good = link(server)
    cases = {
        "expired": link(server, expires=int(time.time()) - 1),
        "bad_signature": good.replace("cid=spring", "cid=autumn"),
        "missing_signature": good.partition("&sig=")[0],
        "bad_expiry": good.replace("&exp=", "&exp=soon"),
        "repeated_parameter": good + "&to=https%3A%2F%2Fevil.example",
        "bad_destination": forged(server, "javascript:alert(document.cookie)"),
        "control_character": forged(server, "https://shop.example/\r\nSet-Cookie: a=b"),
    }
    for reason, url in cases.items():
        status, headers, body = await get(url)
        assert status == 400, reason
        assert "Location" not in headers, reason
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert b"not valid" in body and len(body) < 300
    metrics = await scrape(server)
    for reason in cases:
        assert metric(metrics, "pixel_rejected_requests_total", f'reason="{reason}"') == 1, reason
    assert server.terminate() == 0
    assert await totals_by_key(database) == {}
    assert SECRET not in server.log()


async def test_an_expiry_is_read_only_as_it_was_signed(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    """``int()`` reads ``+T``, ``0T`` and ``T`` with underscores as the same number: each
    another link under one signature. Only the digits as signed are taken."""
    server = pixel_server(f"--dsn={database}", f"--secret={SECRET}")
    good = link(server)
    exp = good.partition("&exp=")[2].partition("&")[0]
    spellings = [f"%2B{exp}", f"0{exp}", f"{exp[:4]}_{exp[4:]}", f"%20{exp}"]
    for spelling in spellings:
        status, headers, _ = await get(good.replace(f"&exp={exp}", f"&exp={spelling}"))
        assert (status, "Location" in headers) == (400, False), spelling
    assert (await get(good))[0] == 302
    metrics = await scrape(server)
    assert metric(metrics, "pixel_rejected_requests_total", 'reason="bad_expiry"') == 4
    assert server.terminate() == 0


async def test_the_redirect_is_the_signed_destination_byte_for_byte(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    """A deep link whose query carries an encoded URL, or whose path has encoded dots, is
    a destination that may check its own signature over the raw string: it gets exactly
    what was signed. One with non-ASCII characters is encoded, as a header must be."""
    server = pixel_server(f"--dsn={database}", f"--secret={SECRET}")
    for to in (
        "https://shop.example/deep?u=http%3A%2F%2Fx.example%3Fa%3D1&s=AbC%2F",
        "https://shop.example/%2e%2e/p?%7Euser",
    ):
        status, headers, _ = await get(link(server, to=to))
        assert (status, headers["Location"]) == (302, to)
    status, headers, _ = await get(link(server, to="https://bücher.example/straße?q=é"))
    assert status == 302
    assert headers["Location"] == "https://xn--bcher-kva.example/stra%C3%9Fe?q=%C3%A9"
    assert server.terminate() == 0


async def test_without_a_secret_clicks_are_refused(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", env={"PIXEL_SECRET": ""})
    status, headers, _ = await get(link(server))
    assert status == 400 and "Location" not in headers
    assert "click links cannot be verified" in server.log()
    assert server.terminate() == 0


async def test_the_longest_link_that_can_be_signed_is_honoured(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    """A link is signed only if its request line fits the server's limit: the longest
    destination that fits works, one byte more is refused when signing, not when clicked."""
    server = pixel_server(f"--dsn={database}", f"--secret={SECRET}")

    def shop(length: int) -> str:  # 2 bytes of UTF-8 a character, 6 once percent-encoded
        return "https://shop.example/p?q=" + "é" * length

    for length in range(1, 1012):  # 1,011 is the most the destination's 2,048 bytes hold
        try:
            link(server, to=shop(length))
        except ValueError as error:
            assert "shorten the destination" in str(error)
            break
    else:
        pytest.fail("every destination made a link")
    longest = length - 1
    # The limit refused was the request line's: the next character would pass it.
    target = link(server, to=shop(longest)).removeprefix(server.base_url)
    assert len(f"GET {target} HTTP/1.1") + len(quote("é")) > MAX_LINE_SIZE
    status, headers, _ = await get(link(server, to=shop(longest)))
    assert status == 302 and URL(headers["Location"]) == URL(shop(longest))
    assert server.terminate() == 0, server.log()


async def test_sign_click_prints_a_link_the_server_honours(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", f"--secret={SECRET}")
    command = [
        PIXEL_SERVER,
        "sign-click",
        f"--base-url={server.base_url}",
        "--cid=spring",
        "--crid=banner-1",
        "--aff=partner-7",
        "--sub=top",
        f"--to={SHOP}",
    ]
    printed = subprocess.run(
        command, capture_output=True, text=True, check=True, env={"PIXEL_SECRET": SECRET}
    )
    url = printed.stdout.strip()
    assert SECRET not in url
    status, headers, _ = await get(url)
    assert (status, headers["Location"]) == (302, SHOP)
    assert server.terminate() == 0
    assert (await totals_by_key(database))[DIMENSIONS][4] == 1

    refused = subprocess.run(command, capture_output=True, text=True, env={"PIXEL_SECRET": ""})
    assert refused.returncode == 2 and "a secret is needed" in refused.stderr
    for base_url in ("px.example", "https://px.example/?x=1", "ftp://px.example"):
        bad_base = [PIXEL_SERVER, "sign-click", f"--base-url={base_url}", f"--to={SHOP}"]
        refused = subprocess.run(
            bad_base, capture_output=True, text=True, env={"PIXEL_SECRET": SECRET}
        )
        assert refused.returncode == 2 and "--base-url: not an http(s) address" in refused.stderr
    bad_host = [*command[:-1], "--to=https://xn--/"]
    refused = subprocess.run(bad_host, capture_output=True, text=True, env={"PIXEL_SECRET": SECRET})
    assert refused.returncode == 2 and "invalid value: bad_destination" in refused.stderr
    short = subprocess.run(command, capture_output=True, text=True, env={"PIXEL_SECRET": "short"})
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    assert "short" not in short.stderr.replace("at least", "")
    # 1,980 bytes of UTF-8, under the destination's limit, but 5,940 once percent-encoded.
    too_long = [*command[:-1], f"--to={SHOP}&q={'日本' * 330}"]
    refused = subprocess.run(too_long, capture_output=True, text=True, env={"PIXEL_SECRET": SECRET})
    assert refused.returncode == 2 and "shorten the destination" in refused.stderr
