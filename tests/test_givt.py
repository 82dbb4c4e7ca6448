"""General Invalid Traffic: answered like humans, counted apart, in the right column."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest
from crawlerdetect import CrawlerDetect
from crawlerdetect.providers.crawlers import data as crawler_patterns
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtests.bench_givt import USER_AGENTS
from server import givt
from tests.harness import PixelServer, scrape, totals_by_key

BOTS = {
    "googlebot": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "bingbot": "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "ahrefs": "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "facebook": "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "curl": "curl/8.5.0",
    "requests": "python-requests/2.31.0",
}
BROWSERS = {
    "chrome": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/124.0.0.0 Safari/537.36",
    "safari-iphone": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15"
    " (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "firefox": "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "samsung": "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko)"
    " SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
}
PREFETCHES = {
    "sec-purpose": {"Sec-Purpose": "prefetch"},
    "sec-purpose-prerender": {"Sec-Purpose": "prefetch;prerender"},
    "purpose": {"Purpose": "prefetch"},
    "x-moz": {"X-Moz": "prefetch"},
    "purpose-capitalised": {"Purpose": "Prefetch"},
    "x-moz-upper-case": {"X-Moz": "PREFETCH"},
}


REFERENCE = CrawlerDetect()
# Patterns CrawlerDetect's crawler list holds, bar those with a lookaround (Hypothesis cannot
# make strings for them); the one it has is tried by hand below.
PATTERNS = [pattern for pattern in crawler_patterns if "(?" not in pattern]
# Printable ASCII: RE2's \d and \w are ASCII where Python's are Unicode (server/givt.py).
ASCII = st.characters(min_codepoint=32, max_codepoint=126)
USER_AGENT_TEXT = st.text(ASCII, max_size=60)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(PATTERNS).flatmap(lambda pattern: st.from_regex(pattern, alphabet=ASCII)),
    USER_AGENT_TEXT,
    st.sampled_from([*BROWSERS.values(), ""]),
)
def test_bots_are_found_as_crawlerdetect_finds_them(matching: str, text: str, browser: str) -> None:
    for user_agent in (matching, f"{browser} {matching} {text}", f"{text}{matching}", text):
        assert is_known_bot(user_agent) == REFERENCE.is_crawler(user_agent), user_agent


@pytest.mark.parametrize(
    "user_agent",
    [
        *(agent for _, agent in USER_AGENTS),
        "Mozilla/5.0 (compatible; YandexBot/3.0)",
        "Mozilla/5.0 YandexSearch/8.10",  # the lookahead: YandexSearch is a browser
        "Yandex/1.0",
        # A phone whose name holds "bot": the exclusions take it out before the bot patterns.
        "Mozilla/5.0 (Linux; Android 11; CUBOT P50) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/120.0.0.0 Mobile Safari/537.36",
        "a" * 300,
        "bot" * 100,
        "Mozilla/5.0 " * 40,
    ],
)
def test_user_agents_of_the_benchmark_mix_get_crawlerdetects_verdict(user_agent: str) -> None:
    assert is_known_bot(user_agent) == REFERENCE.is_crawler(user_agent)


def is_known_bot(user_agent: str) -> bool:
    return givt.classify({"User-Agent": user_agent}) == givt.KNOWN_BOT


@pytest.mark.parametrize("user_agent", BOTS.values(), ids=BOTS.keys())
def test_known_bots_are_givt(user_agent: str) -> None:
    assert givt.classify({"User-Agent": user_agent}) == givt.KNOWN_BOT


@pytest.mark.parametrize("user_agent", BROWSERS.values(), ids=BROWSERS.keys())
def test_browsers_are_human(user_agent: str) -> None:
    assert givt.classify({"User-Agent": user_agent}) is None


async def test_each_kind_of_traffic_lands_in_its_column(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}")
    requests: list[tuple[str, dict[str, str]]] = [
        *((f"bot-{name}", {"User-Agent": ua}) for name, ua in BOTS.items()),
        *((f"human-{name}", {"User-Agent": ua}) for name, ua in BROWSERS.items()),
        *(
            (f"prefetch-{name}", {"User-Agent": BROWSERS["chrome"], **extra})
            for name, extra in PREFETCHES.items()
        ),
        ("empty-ua", {"User-Agent": ""}),
        ("blank-ua", {"User-Agent": "   "}),
    ]
    async with aiohttp.ClientSession(skip_auto_headers={"User-Agent"}) as session:
        for cid, headers in requests:
            async with session.get(f"{server.base_url}/i.gif?cid={cid}", headers=headers) as answer:
                assert answer.status == 200
                assert len(await answer.read()) == 43
        async with session.get(f"{server.base_url}/i.gif?cid=no-ua-header") as answer:
            assert answer.status == 200
    metrics = await scrape(server)
    assert server.terminate() == 0
    stored = {key[0]: counts for key, counts in (await totals_by_key(database)).items()}
    for cid, _ in requests:
        human = cid.startswith("human-")
        assert stored[cid] == ((1, 0) if human else (0, 1)) + (0, 0, 0, 0), cid
    assert stored["no-ua-header"] == (0, 1, 0, 0, 0, 0)
    assert f'pixel_givt_requests_total{{reason="known_bot"}} {len(BOTS)}' in metrics
    assert f'pixel_givt_requests_total{{reason="prefetch"}} {len(PREFETCHES)}' in metrics
    assert 'pixel_givt_requests_total{reason="empty_user_agent"} 3' in metrics
