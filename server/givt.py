"""General Invalid Traffic (IAB/MRC): requests answered normally but kept out of human counts.

Prefetch and prerender requests, requests with no User-Agent, and known bots and spiders by
User-Agent (the open CrawlerDetect patterns, MIT licence) are GIVT. Answering them exactly like
humans keeps the detection from being revealed.

The patterns are matched by RE2, in time linear in the User-Agent's length, as CrawlerDetect
matches them (its exclusions removed first, then any crawler pattern found). Python's
backtracking ``re``, which CrawlerDetect itself uses, takes time quadratic in a long run of
letters or digits in the header (5.5 s for 8,000 of them), so one request could stall a
worker. RE2 has no lookaround: the few patterns with one are matched by ``re`` on their own,
and each is a literal followed by a lookahead, linear as well. RE2's digit, word and
word-boundary classes are ASCII where those of ``re`` are Unicode: a User-Agent with digits of
another script (Arabic-Indic, say) where a pattern has ASCII ones is not taken for that bot.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import re2
from crawlerdetect.providers.crawlers import data as crawler_patterns
from crawlerdetect.providers.exclusions import data as exclusion_patterns

PREFETCH = "prefetch"
EMPTY_USER_AGENT = "empty_user_agent"
KNOWN_BOT = "known_bot"

# User-Agents repeat heavily, so the verdict is cached per string: a hit is one dict lookup
# instead of a pass over the patterns. Bounded, and long strings, rare in real
# traffic, are not kept.
_CACHE_SIZE = 16_384
_CACHED_LENGTH = 512


def _lookaround(pattern: str) -> bool:
    return any(group in pattern for group in ("(?=", "(?!", "(?<=", "(?<!"))


def _re2(patterns: list[str]) -> re2._Regexp:
    options = re2.Options()
    options.case_sensitive = False
    return re2.compile("|".join(patterns), options)


_EXCLUSIONS = _re2(exclusion_patterns)
_CRAWLERS = _re2([pattern for pattern in crawler_patterns if not _lookaround(pattern)])
_CRAWLERS_WITH_LOOKAROUND = re.compile(
    "|".join(pattern for pattern in crawler_patterns if _lookaround(pattern)) or "(?!)",
    re.IGNORECASE,
)


def _is_crawler(user_agent: str) -> bool:
    if not user_agent.isascii():
        # RE2 takes UTF-8 only, and a header's undecodable bytes arrive as lone surrogates.
        user_agent = user_agent.encode("utf-8", "replace").decode("utf-8")
    agent = _EXCLUSIONS.sub("", user_agent)
    return bool(agent) and bool(_CRAWLERS.search(agent) or _CRAWLERS_WITH_LOOKAROUND.search(agent))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_is_bot(user_agent: str) -> bool:
    return _is_crawler(user_agent)


def is_bot(user_agent: str) -> bool:
    if len(user_agent) > _CACHED_LENGTH:
        return _is_crawler(user_agent)
    return _cached_is_bot(user_agent)


def classify(headers: Mapping[str, str]) -> str | None:
    """Returns the GIVT reason of a request, or ``None`` for a human one."""
    # Browsers send these tokens in lower case; HTTP tokens compare without regard to case.
    if (
        headers.get("Sec-Purpose", "").lower().startswith("prefetch")
        or headers.get("Purpose", "").strip().lower() == "prefetch"
        or headers.get("X-Moz", "").strip().lower() == "prefetch"
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
