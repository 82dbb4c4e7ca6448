"""The reference the pixel server is measured against: a minimal aiohttp ``web.Application``
on uvloop answering the same GIF and counting in a dict, with no access log.

    python -m loadtests.reference_app --port 18081
"""

from __future__ import annotations

import argparse
import collections

import uvloop
from aiohttp import web

from server.pixel import GIF, PIXEL_HEADERS

counts: collections.Counter[tuple[str, str, str, str]] = collections.Counter()


async def pixel(request: web.Request) -> web.Response:
    query = request.query
    counts[
        (query.get("cid", ""), query.get("crid", ""), query.get("aff", ""), query.get("sub", ""))
    ] += 1
    return web.Response(body=GIF, headers=PIXEL_HEADERS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/i.gif", pixel)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
