"""General Invalid Traffic (IAB/MRC): requests answered normally but kept out of human counts.

Prefetch and prerender requests, requests with no User-Agent, and known bots and spiders by
User-Agent (the open CrawlerDetect patterns, MIT licence) are GIVT. Answering them exactly like
humans keeps the detection from being revealed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from crawlerdetect import CrawlerDetect

PREFETCH = "prefetch"
EMPTY_USER_AGENT = "empty_user_agent"
KNOWN_BOT = "known_bot"

# User-Agents repeat heavily, so the verdict is cached per string: a hit is one dict lookup
# instead of a pass over hundreds of patterns (50-500 us). Bounded, and long strings, rare
# in real traffic, are not kept.
_CACHE_SIZE = 16_384
_CACHED_LENGTH = 512
_detector = CrawlerDetect()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_is_bot(user_agent: str) -> bool:
    return bool(_detector.isCrawler(user_agent))


def is_bot(user_agent: str) -> bool:
    if len(user_agent) > _CACHED_LENGTH:
        return bool(_detector.isCrawler(user_agent))
    return _cached_is_bot(user_agent)


def classify(headers: Mapping[str, str]) -> str | None:
    """Returns the GIVT reason of a request, or ``None`` for a human one."""
    if (
        headers.get("Sec-Purpose", "").startswith("prefetch")
        or headers.get("Purpose", "") == "prefetch"
        or headers.get("X-Moz", "") == "prefetch"
    ):
        return PREFETCH
    return classify_user_agent(headers.get("User-Agent", "").strip())


def classify_user_agent(user_agent: str) -> str | None:
    """The GIVT reason of a request that is not a prefetch, by its User-Agent (without the
    spaces around it), or ``None`` for a human one."""
    if not user_agent:
        return EMPTY_USER_AGENT
    if is_bot(user_agent):
        return KNOWN_BOT
    return None


def warm_up() -> None:
    """Compiles the patterns now rather than on the first request (about 50 ms)."""
    is_bot("Mozilla/5.0")
