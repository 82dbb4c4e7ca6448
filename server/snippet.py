"""The HTML an operator pastes into a creative: the impression pixel, the viewability script
and, given a destination, the signed click link (``pixel-server snippet``)."""

from __future__ import annotations

import argparse
from html import escape
from urllib.parse import quote, urlencode

from server.query import Dimensions, check_value

# Replaced by the ad server with a fresh random value at every render; `cb` is not counted.
CACHE_BUSTER = "[CACHEBUSTER]"


def snippet(
    base_url: str,
    dimensions: Dimensions,
    *,
    cache_buster: str = CACHE_BUSTER,
    video: bool = False,
    target: str = "",
    click_url: str | None = None,
) -> str:
    """The snippet for one creative, served from ``base_url`` (the pixel server's public
    address). Paste it inside the creative's container: the script measures its parent element,
    or the element ``target`` selects.

    >>> print(snippet("https://px.example", Dimensions("spring", "b-1", "p7", "top & bottom")))
    <img src="https://px.example/i.gif?cid=spring&amp;crid=b-1&amp;aff=p7&amp;sub=top%20%26%20bottom&amp;cb=[CACHEBUSTER]" width="1" height="1" alt="" style="position:absolute;border:0">
    <script async src="https://px.example/v.js" data-cid="spring" data-crid="b-1" data-aff="p7" data-sub="top &amp; bottom"></script>
    """  # noqa: E501
    base = base_url.rstrip("/")
    campaign, creative, affiliate, sub_id = dimensions
    query = urlencode(
        {"cid": campaign, "crid": creative, "aff": affiliate, "sub": sub_id}, quote_via=quote
    )
    attributes = {
        "src": f"{base}/v.js",
        "data-cid": campaign,
        "data-crid": creative,
        "data-aff": affiliate,
        "data-sub": sub_id,
    }
    if video:
        attributes["data-format"] = "video"
    if target:
        attributes["data-target"] = target
    script_attributes = "".join(f' {name}="{escape(value)}"' for name, value in attributes.items())
    lines = [
        f'<img src="{escape(f"{base}/i.gif?{query}&cb={cache_buster}")}" width="1" height="1"'
        ' alt="" style="position:absolute;border:0">',
        f"<script async{script_attributes}></script>",
    ]
    if click_url is not None:
        lines.append(
            f'<a href="{escape(click_url)}" target="_blank" rel="noopener">'
            "<!-- the creative --></a>"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``pixel-server snippet`` beyond those of a click link."""
    parser.add_argument(
        "--video", action="store_true", help="measure by the video rule (50%% for 2 s)"
    )
    parser.add_argument(
        "--target",
        default="",
        metavar="SELECTOR",
        help="CSS selector of the element to measure (default: the snippet's container)",
    )
    parser.add_argument(
        "--cache-buster",
        default=CACHE_BUSTER,
        metavar="MACRO",
        help=f"your ad server's cache-buster macro (default {CACHE_BUSTER})",
    )


def from_arguments(args: argparse.Namespace, click_url: str | None) -> str:
    """The snippet the parsed flags describe; raises ``Rejected`` for an invalid dimension."""
    dimensions = Dimensions(*(check_value(v) for v in (args.cid, args.crid, args.aff, args.sub)))
    return snippet(
        args.base_url,
        dimensions,
        cache_buster=args.cache_buster,
        video=args.video,
        target=args.target,
        click_url=click_url,
    )
