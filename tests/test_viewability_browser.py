"""Viewability in a real browser: Debian's chromium loads pages that embed the snippet, its
script talks to a real ``pixel-server`` over loopback, and the counts are read from PostgreSQL.

The rule is about time, so the scenarios keep margins around it: 1.5 s in view against the
1 s rule, 0.6 s against it, 2.6 s and 1.5 s against the 2 s video rule.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec

import pytest
from playwright.async_api import Browser, Page

from server.query import Dimensions
from server.snippet import snippet
from tests.browser import (
    VIEWPORT_HEIGHT,
    VIEWPORT_WIDTH,
    Beacons,
    PageServer,
    chromium,
    new_context,
)
from tests.harness import PixelServer, fetch

# Bounds each test as a whole; a scenario takes a few seconds.
TEST_TIMEOUT = 60.0
SCROLLED_AWAY = 3000

P = ParamSpec("P")

STYLE = (
    "html{overflow-x:hidden}body{margin:0;height:5000px;position:relative}"
    ".ad{position:absolute;background:#8ac}"
)

# Feeds a <video> from a canvas stream: it plays in headless Chromium with no codec or file.
PLAY_VIDEO = """<script>
var canvas = document.createElement('canvas'), n = 0;
setInterval(function () {
  var g = canvas.getContext('2d');
  g.fillStyle = (n++ % 2) ? '#111' : '#eee';
  g.fillRect(0, 0, 8, 8);
}, 40);
var v = document.querySelector('#playing video');
v.srcObject = canvas.captureStream(25);
v.play();
</script>"""

HIDE = """() => {
  Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'});
  Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
  document.dispatchEvent(new Event('visibilitychange'));
}"""
SHOW = """() => {
  delete document.visibilityState;
  delete document.hidden;
  document.dispatchEvent(new Event('visibilitychange'));
}"""


def creative(
    server: PixelServer,
    crid: str,
    *,
    top: int,
    left: int = 0,
    width: int = 300,
    height: int = 250,
    video: bool = False,
    inside: str = "",
) -> str:
    """A creative's container holding its content and the snippet, as an operator pastes it."""
    tag = snippet(
        server.base_url,
        Dimensions("view", crid, "aff-" + crid, "sub-" + crid),
        cache_buster=str(random.getrandbits(48)),
        video=video,
    )
    style = f"top:{top}px;left:{left}px;width:{width}px;height:{height}px"
    return f'<div class="ad" id="{crid}" style="{style}">{inside}{tag}</div>'


def page(*parts: str) -> str:
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>creative test</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


def visible_from(fraction: float, height: int = 250) -> int:
    """The ``top`` that leaves ``fraction`` of a creative's height above the fold."""
    return VIEWPORT_HEIGHT - round(fraction * height)


async def counts(database: str) -> dict[str, tuple[int, int]]:
    """``creative -> (measurable, viewable)``, checking every row's key is the creative's."""
    rows = await fetch(
        database,
        "SELECT campaign, creative, affiliate, sub_id, sum(measurable)::int AS measurable,"
        " sum(viewable)::int AS viewable FROM pixel_counts"
        " WHERE measurable > 0 OR viewable > 0 GROUP BY 1, 2, 3, 4",
    )
    found = {}
    for row in rows:
        crid = row["creative"]
        assert (row["campaign"], row["affiliate"], row["sub_id"]) == (
            "view",
            "aff-" + crid,
            "sub-" + crid,
        )
        found[crid] = (row["measurable"], row["viewable"])
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as browser:
        yield browser


@pytest.fixture
async def pages() -> AsyncIterator[PageServer]:
    server = PageServer()
    await server.start()
    yield server
    await server.stop()


class Visit:
    """One browser tab on the test's pages, the requests it sends, and the server they reach."""

    def __init__(self, page: Page, pages: PageServer, pixel: PixelServer, database: str) -> None:
        self.page = page
        self.pages = pages
        self.pixel = pixel
        self.database = database
        self.beacons = Beacons(page)

    def creative(self, crid: str, **layout: Any) -> str:
        return creative(self.pixel, crid, **layout)

    async def open(self, path: str) -> None:
        await self.page.goto(self.pages.url(path))

    async def show(self, *parts: str) -> None:
        """Opens a page of these parts (creatives, scripts) at ``/ad``."""
        self.pages.pages["/ad"] = page(*parts)
        await self.open("/ad")

    async def scroll_to(self, y: int) -> None:
        await self.page.evaluate("y => window.scrollTo(0, y)", y)

    async def counts(self) -> dict[str, tuple[int, int]]:
        """Lets every request sent reach the server, checks the page saw no error of ours,
        stops the server, whose final flush writes the counts, and reads them."""
        await self.beacons.settled()
        assert self.beacons.errors == []
        await self.page.context.close()
        assert self.pixel.terminate() == 0
        return await counts(self.database)


@pytest.fixture
async def visit(
    browser: Browser, pages: PageServer, pixel_server: Callable[..., PixelServer], database: str
) -> AsyncIterator[Visit]:
    pixel = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    context = await new_context(browser)
    yield Visit(await context.new_page(), pages, pixel, database)
    await context.close()


def bounded(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """Fails the test, rather than hanging, past :data:`TEST_TIMEOUT`."""

    @functools.wraps(test)
    async def run(*args: P.args, **kwargs: P.kwargs) -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await test(*args, **kwargs)

    return run


@bounded
async def test_in_view_for_1_5_s_is_measurable_and_viewable(visit: Visit) -> None:
    await visit.show(visit.creative("seen", top=0))
    await asyncio.sleep(1.5)
    await visit.scroll_to(SCROLLED_AWAY)
    assert visit.beacons.events() == ["m", "v"]
    assert visit.beacons.methods() == {"POST"}  # navigator.sendBeacon
    assert await visit.counts() == {"seen": (1, 1)}


@bounded
async def test_in_view_for_0_6_s_then_scrolled_away_is_not_viewable(visit: Visit) -> None:
    await visit.show(visit.creative("glimpse", top=0))
    await asyncio.sleep(0.6)
    await visit.scroll_to(SCROLLED_AWAY)
    await asyncio.sleep(1.5)  # a clock that ran on out of view would have fired by now
    assert await visit.counts() == {"glimpse": (1, 0)}


@bounded
async def test_the_share_in_view_depends_on_the_creative_size(visit: Visit) -> None:
    await visit.show(
        # 300x250, 40% in view: under the 50% rule.
        visit.creative("small-40", top=visible_from(0.40)),
        # 970x250 = 242,500 px^2, a large creative: 35% is over its 30% rule...
        visit.creative("large-35", top=visible_from(0.35), left=320, width=970),
        # ... and 25% (the viewport cuts its right three quarters) is under it.
        visit.creative("large-25", top=0, left=VIEWPORT_WIDTH - 970 // 4, width=970),
    )
    await asyncio.sleep(3)
    assert await visit.counts() == {
        "small-40": (1, 0),
        "large-35": (1, 1),
        "large-25": (1, 0),
    }


@bounded
async def test_hidden_tab_restarts_the_clock_real_visibility_change(visit: Visit) -> None:
    """The page is left for another and brought back from the back/forward cache: the
    browser itself makes it hidden and visible again (see tests/browser.py)."""
    visit.pages.pages["/elsewhere"] = page("<p>another page</p>")

    async def away_and_back(away: float) -> None:
        await visit.open("/elsewhere")
        await asyncio.sleep(away)
        await visit.page.go_back(wait_until="commit")
        await visit.page.wait_for_function("window.restored === true")
        await visit.page.evaluate("window.restored = false")

    await visit.show(
        visit.creative("tabbed", top=0),
        "<script>addEventListener('pageshow', function (e) { window.restored = e.persisted; });"
        "</script>",
    )
    await asyncio.sleep(0.8)
    await away_and_back(1.0)
    await asyncio.sleep(0.6)  # 0.8 + 0.6 s visible, but not continuously
    await away_and_back(0.3)
    assert visit.beacons.events() == ["m"]
    await asyncio.sleep(1.5)
    assert visit.beacons.events() == ["m", "v"]
    assert await visit.counts() == {"tabbed": (1, 1)}


@bounded
async def test_hidden_tab_stops_the_clock_emulated_visibility_state(visit: Visit) -> None:
    """The page stays alive and its timers run while its Page Visibility state says hidden
    (overridden, with a real ``visibilitychange`` event): the clock must stop, not just pause."""
    await visit.show(visit.creative("hidden", top=0))
    await asyncio.sleep(0.6)
    await visit.page.evaluate(HIDE)
    await asyncio.sleep(1.0)  # a clock that ran on while hidden would fire here
    await visit.page.evaluate(SHOW)
    await asyncio.sleep(0.6)
    assert visit.beacons.events() == ["m"]
    await asyncio.sleep(1.0)
    assert visit.beacons.events() == ["m", "v"]
    assert await visit.counts() == {"hidden": (1, 1)}


@bounded
async def test_two_creatives_on_one_page_are_counted_apart(visit: Visit) -> None:
    await visit.show(
        visit.creative("above", top=0),
        visit.creative("below", top=2000),
    )
    await asyncio.sleep(1.5)
    assert await visit.counts() == {"above": (1, 1), "below": (1, 0)}


@bounded
async def test_a_target_the_parser_has_not_reached_yet_is_measured(visit: Visit) -> None:
    """data-target names an element after the script: a script that runs at once (not async,
    or async and quick) finds none yet, and looks again once the document is parsed."""
    tag = snippet(
        visit.pixel.base_url,
        Dimensions("view", "late", "aff-late", "sub-late"),
        cache_buster=str(random.getrandbits(48)),
        target="#late",
    ).replace("<script async", "<script")
    await visit.show(
        tag, '<div class="ad" id="late" style="top:0;left:0;width:300px;height:250px"></div>'
    )
    await asyncio.sleep(1.5)
    assert visit.beacons.events() == ["m", "v"]
    assert await visit.counts() == {"late": (1, 1)}


@bounded
async def test_a_reload_is_a_new_render_and_one_render_never_counts_twice(visit: Visit) -> None:
    await visit.show(visit.creative("again", top=0))
    await asyncio.sleep(1.5)
    await visit.scroll_to(SCROLLED_AWAY)
    await asyncio.sleep(0.2)
    await visit.scroll_to(0)
    await asyncio.sleep(1.5)  # viewable again, on the same render
    assert visit.beacons.events() == ["m", "v"]
    await visit.page.reload()
    await asyncio.sleep(1.5)
    assert visit.beacons.events() == ["m", "v", "m", "v"]
    assert await visit.counts() == {"again": (2, 2)}


@bounded
async def test_video_needs_2_s_of_play_in_view(visit: Visit) -> None:
    video = '<video muted playsinline width="400" height="300"></video>'
    await visit.show(
        visit.creative("playing", top=0, width=400, height=300, video=True, inside=video),
        visit.creative("paused", top=0, left=420, width=400, height=300, video=True, inside=video),
        PLAY_VIDEO,
    )
    await asyncio.sleep(1.5)
    assert visit.beacons.events("playing") == ["m"]  # a display creative would be viewable
    await asyncio.sleep(1.1)
    assert visit.beacons.events("playing") == ["m", "v"]
    assert await visit.page.evaluate("document.querySelector('#playing video').paused") is False
    assert await visit.counts() == {"playing": (1, 1), "paused": (1, 0)}


@bounded
async def test_without_send_beacon_the_events_go_as_images(visit: Visit) -> None:
    await visit.page.add_init_script("delete Navigator.prototype.sendBeacon")
    await visit.show(visit.creative("imaged", top=0))
    await asyncio.sleep(1.5)
    assert visit.beacons.events() == ["m", "v"]
    assert visit.beacons.methods() == {"GET"}
    assert await visit.counts() == {"imaged": (1, 1)}


@bounded
async def test_a_prerendered_page_measures_nothing_until_shown(visit: Visit) -> None:
    """``document.prerendering`` is emulated: Chromium turns real prerendering off while
    DevTools (Playwright) is attached (PrerenderingDisabledByDevTools)."""
    await visit.page.add_init_script(
        "window.prerendering = true;"
        "Object.defineProperty(document, 'prerendering', {get: () => window.prerendering});"
    )
    await visit.show(visit.creative("prerendered", top=0))
    await asyncio.sleep(1.5)
    assert visit.beacons.events() == []
    await visit.page.evaluate(
        "window.prerendering = false; document.dispatchEvent(new Event('prerenderingchange'))"
    )
    await asyncio.sleep(1.5)
    assert visit.beacons.events() == ["m", "v"]
    assert await visit.counts() == {"prerendered": (1, 1)}


@bounded
async def test_a_browser_without_intersection_observer_sends_nothing_and_breaks_nothing(
    visit: Visit,
) -> None:
    await visit.page.add_init_script("delete window.IntersectionObserver")
    await visit.show(
        visit.creative("old", top=0),
        "<script>window.hostPageRan = true;</script>",
    )
    await asyncio.sleep(1.5)
    assert await visit.page.evaluate("window.hostPageRan") is True
    assert visit.beacons.sent == []
    assert await visit.counts() == {}
    rows = await fetch(visit.database, "SELECT creative, impressions FROM pixel_counts")
    assert [tuple(row) for row in rows] == [("old", 1)]  # the pixel itself still counts


def targeting(visit: Visit, crid: str, slot: str) -> str:
    """The snippet for creative ``crid``, measuring the element ``slot`` names."""
    return snippet(
        visit.pixel.base_url,
        Dimensions("view", crid, "aff-" + crid, "sub-" + crid),
        cache_buster=str(random.getrandbits(48)),
        target=slot,
    )


async def restyle(visit: Visit, element: str, style: str) -> None:
    await visit.page.evaluate(
        "([id, style]) => document.getElementById(id).setAttribute('style', style)",
        [element, style],
    )


@bounded
async def test_an_empty_slot_filled_later_is_measured_at_its_size(visit: Visit) -> None:
    """An ad slot the creative fills after the script runs: of no size at first (so never in
    view, whatever the observer's ratio), then 300x250 fully in view, which no threshold
    crossing reports; the resize is measured."""
    await visit.show(
        '<div class="ad" id="slot" style="top:0;left:0;width:300px;height:0"></div>',
        targeting(visit, "slot", "#slot"),
    )
    await asyncio.sleep(0.5)
    await restyle(visit, "slot", "top:0;left:0;width:300px;height:250px")
    await asyncio.sleep(1.5)
    assert visit.beacons.events() == ["m", "v"]
    assert await visit.counts() == {"slot": (1, 1)}


@bounded
async def test_a_resize_across_the_large_creative_size_changes_the_share_needed(
    visit: Visit,
) -> None:
    """40% in view: a 300x250 creative widened to 970x250 (242,500 px^2) now needs 30% and is
    viewable; a 970x250 one narrowed to 300x250 within its second now needs 50% and is not."""
    top = visible_from(0.4)
    await visit.show(
        visit.creative("grown", top=top, width=300),
        visit.creative("shrunk", top=top, left=320, width=970),
    )
    await asyncio.sleep(0.5)
    await restyle(visit, "grown", f"top:{top}px;left:0;width:970px;height:250px")
    await restyle(visit, "shrunk", f"top:{top}px;left:1000px;width:300px;height:250px")
    await asyncio.sleep(1.5)
    assert await visit.counts() == {"grown": (1, 1), "shrunk": (1, 0)}


@bounded
async def test_a_creative_hidden_by_style_is_not_viewable_until_shown(visit: Visit) -> None:
    """In the viewport, but with none of its pixels on screen: visibility:hidden, or an
    ancestor at opacity 0. The first is shown after 1.2 s and counts a second later."""
    invisible = visit.creative("invisible", top=0)
    transparent = visit.creative("transparent", top=0, left=320)
    await visit.show(
        invisible.replace('style="', 'style="visibility:hidden;', 1),
        f'<div style="opacity:0">{transparent}</div>',
    )
    await asyncio.sleep(1.2)
    await restyle(visit, "invisible", "top:0;left:0;width:300px;height:250px")
    await asyncio.sleep(1.5)
    assert visit.beacons.events("invisible") == ["m", "v"]
    assert await visit.counts() == {"invisible": (1, 1), "transparent": (1, 0)}


@bounded
async def test_a_video_creative_without_a_player_is_not_measurable(visit: Visit) -> None:
    """Its play cannot be measured (a player in a cross-origin frame, say): nothing is sent,
    rather than counting it viewable after 2 s in view."""
    await visit.show(visit.creative("playerless", top=0, width=400, height=300, video=True))
    await asyncio.sleep(2.6)
    assert visit.beacons.sent == []
    assert await visit.counts() == {}


@bounded
async def test_a_video_that_buffers_is_not_playing(visit: Visit) -> None:
    """Stalled for data (``waiting``, readyState under HAVE_FUTURE_DATA), a video does not
    play, though not paused: the clock stops, and starts again when it plays on."""
    video = '<video muted playsinline width="400" height="300"></video>'
    await visit.show(
        visit.creative("playing", top=0, width=400, height=300, video=True, inside=video),
        PLAY_VIDEO,
    )
    await asyncio.sleep(1.0)
    stall = (
        "v => { Object.defineProperty(v, 'readyState', {configurable: true, get: () => 2});"
        " v.dispatchEvent(new Event('waiting')); }"
    )
    await visit.page.eval_on_selector("#playing video", stall)
    await asyncio.sleep(1.5)  # 2.5 s in view, but not 2 s of play
    assert visit.beacons.events("playing") == ["m"]
    await visit.page.eval_on_selector(
        "#playing video", "v => { delete v.readyState; v.dispatchEvent(new Event('playing')); }"
    )
    await asyncio.sleep(2.6)
    assert visit.beacons.events("playing") == ["m", "v"]
    assert await visit.counts() == {"playing": (1, 1)}
