"""General Invalid Traffic (IAB/MRC): requests answered normally but kept out of human counts.

Prefetch and prerender requests, and requests with no User-Agent, are GIVT.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFETCH = "prefetch"
EMPTY_USER_AGENT = "empty_user_agent"


def classify(headers: Mapping[str, str]) -> str | None:
    """Returns the GIVT reason of a request, or ``None`` for a human one."""
    if (
        headers.get("Sec-Purpose", "").startswith("prefetch")
        or headers.get("Purpose", "") == "prefetch"
        or headers.get("X-Moz", "") == "prefetch"
    ):
        return PREFETCH
    if not headers.get("User-Agent", "").strip():
        return EMPTY_USER_AGENT
    return None
