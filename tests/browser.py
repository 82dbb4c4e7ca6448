"""A real browser for the tests: Debian's chromium driven by Playwright, the pages it loads served
by the test itself on loopback, and a record of the viewability events those pages send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, Request, async_playwright

from tests.harness import free_port

# Playwright cannot download browsers here; tests/run.sh installs Debian's.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Playwright turns the back/forward cache off. Headless Chromium keeps every tab visible (another
# tab brought to the front hides nothing), so leaving a page and coming back to it from the cache
# is the one real change of its Page Visibility state there is: `hidden` as it goes, `visible`
# as it comes back, the same document and the same script throughout.
KEEP_BACK_FORWARD_CACHE = ["--disable-back-forward-cache"]
# A desktop Chrome's: the server counts "HeadlessChrome" as a bot (GIVT), never as measurable.
USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Safari/537.36"
)
VIEWPORT_WIDTH = 1400
VIEWPORT_HEIGHT = 600


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: bash tests/run.sh installs it"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            ignore_default_args=KEEP_BACK_FORWARD_CACHE,
            timeout=30_000,
        )
        try:
            yield browser
        finally:
            await browser.close()


async def new_context(browser: Browser) -> BrowserContext:
    context = await browser.new_context(
        viewport={"width": VIEWPORT_WIDTH, "height": VIEWPORT_HEIGHT}, user_agent=USER_AGENT
    )
    context.set_default_timeout(10_000)
    return context


class PageServer:
    """Serves the test's pages, ``path -> HTML``, on a loopback port of its own."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _page(self, request: web.Request) -> web.Response:
        html = self.pages.get(request.path)
        if html is None:
            raise web.HTTPNotFound()
        return web.Response(text=html, content_type="text/html")


class Beacons:
    """The ``/v.gif`` requests of a page as the browser sent them, and the page's errors."""

    def __init__(self, page: Page) -> None:
        self.sent: list[Request] = []
        self.errors: list[str] = []
        self._pending: set[Request] = set()
        self._settled = asyncio.Event()
        self._settled.set()
        page.on("request", self._started)
        page.on("requestfinished", self._ended)
        page.on("requestfailed", self._ended)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def events(self, creative: str | None = None) -> list[str]:
        """The ``e`` of each request sent so far, in order, for one creative or all."""
        found = []
        for request in self.sent:
            query = parse_qs(urlsplit(request.url).query)
            if creative is None or query.get("crid") == [creative]:
                found.extend(query.get("e", []))
        return found

    def methods(self) -> set[str]:
        return {request.method for request in self.sent}

    async def settled(self, timeout: float = 10.0) -> None:
        """Waits until every request sent so far has been answered (or has failed)."""
        async with asyncio.timeout(timeout):
            await self._settled.wait()

    def _started(self, request: Request) -> None:
        if urlsplit(request.url).path == "/v.gif":
            self.sent.append(request)
            self._pending.add(request)
            self._settled.clear()

    def _ended(self, request: Request) -> None:
        self._pending.discard(request)
        if not self._pending:
            self._settled.set()
