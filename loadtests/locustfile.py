"""Locust: browsers rendering creatives, every answered event tallied for reconciliation.

    locust --headless -u 200 -r 50 -t 60s -H http://127.0.0.1:8080 --tally-dir tallies
    python -m loadtests.verify --tally-dir tallies --dsn postgresql://...

A user renders a creative: the impression pixel with a fresh cache-buster, then ``measurable``
for the share that can measure, ``viewable`` once the creative has stayed in view for its second,
and a signed click at a realistic CTR (needs ``PIXEL_SECRET``, the server's secret). A small share
of malformed pixels (oversized values, broken encodings) must be answered and not stored. Keys
follow a skewed mix: a few big campaigns, many creatives, a long tail of affiliates and sub-ids.

Each process (``--processes N`` forks N) writes what the server answered, per key and event, to
``--tally-dir`` when it quits; ``loadtests.verify`` adds them up and compares with
``pixel_counts``. The run's keys carry its own campaign prefix, so other traffic never counts.
"""

from __future__ import annotations

import collections
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from locust import FastHttpUser, events, task
from locust.env import Environment

from server.clicks import click_url
from server.query import Dimensions

BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/124.0.0.0 Safari/537.36"
)
EVENTS = ("impression", "measurable", "viewable", "click", "rejected")
# Campaigns by weight (a few big ones), many creatives, long tails of affiliates and sub-ids.
CAMPAIGN_WEIGHTS = [50, 25, 12, 6, 4, 2, 1]
CREATIVES = 40
AFFILIATES = 300
SUB_IDS = 1_000

tally: collections.Counter[tuple[str, str, str, str, str]] = collections.Counter()
run_id = os.environ.get("PIXEL_LOAD_RUN_ID") or uuid.uuid4().hex[:8]


def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("pixel-server")
    group.add_argument("--tally-dir", default="", help="where each process writes its tally")
    group.add_argument("--measurable-share", type=float, default=0.9)
    group.add_argument("--viewable-share", type=float, default=0.6, help="of the measurable")
    group.add_argument("--ctr", type=float, default=0.02, help="clicks per impression")
    group.add_argument("--malformed-share", type=float, default=0.01)
    group.add_argument("--max-fail-ratio", type=float, default=0.0)
    group.add_argument("--max-p95-ms", type=float, default=1_000.0)


def skewed(rng: random.Random, size: int) -> int:
    """An index in [0, size) with a long tail: small ones are far more frequent."""
    return min(size - 1, int(rng.paretovariate(1.2)) - 1)


class CreativeViewer(FastHttpUser):
    """A browser that renders creatives one after another."""

    def on_start(self) -> None:
        self.rng = random.Random()
        self.secret = os.environ.get("PIXEL_SECRET", "").split(",")[0]

    def key(self) -> Dimensions:
        rng = self.rng
        campaign = rng.choices(range(len(CAMPAIGN_WEIGHTS)), CAMPAIGN_WEIGHTS)[0]
        return Dimensions(
            f"lt-{run_id}-c{campaign}",
            f"cr{skewed(rng, CREATIVES)}",
            f"aff{skewed(rng, AFFILIATES)}",
            f"s{skewed(rng, SUB_IDS)}",
        )

    def query(self, key: Dimensions) -> str:
        return (
            f"cid={key.campaign}&crid={key.creative}&aff={key.affiliate}&sub={key.sub_id}"
            f"&cb={self.rng.getrandbits(48)}"
        )

    @task
    def render(self) -> None:
        options = self.environment.parsed_options
        assert options is not None
        key = self.key()
        if self.rng.random() < options.malformed_share:
            self.malformed(key)
            return
        if not self.get_gif(f"/i.gif?{self.query(key)}", "/i.gif"):
            return
        tally[(*key, "impression")] += 1
        if self.rng.random() >= options.measurable_share:
            return
        if not self.beacon(key, "m"):
            return
        tally[(*key, "measurable")] += 1
        if self.rng.random() < options.viewable_share:
            time.sleep(1.0)  # in view for the MRC second (gevent yields)
            if self.beacon(key, "v"):
                tally[(*key, "viewable")] += 1
        if self.secret and self.rng.random() < options.ctr / options.measurable_share:
            self.click(key)

    def get_gif(self, path: str, name: str) -> bool:
        with self.client.get(
            path, name=name, headers={"User-Agent": BROWSER}, catch_response=True
        ) as answer:
            if answer.status_code == 200 and len(answer.content or b"") == 43:
                answer.success()
                return True
            answer.failure(f"{answer.status_code}, {len(answer.content or b'')} bytes")
            return False

    def beacon(self, key: Dimensions, event: str) -> bool:
        with self.client.post(
            f"/v.gif?e={event}&{self.query(key)}",
            name=f"/v.gif?e={event}",
            headers={"User-Agent": BROWSER, "Content-Type": "text/plain"},
            data="",
            catch_response=True,
        ) as answer:
            if answer.status_code == 204:
                answer.success()
                return True
            answer.failure(f"{answer.status_code}")
            return False

    def click(self, key: Dimensions) -> None:
        url = click_url(
            "", self.secret, key, "https://shop.example/landing", int(time.time()) + 600
        )
        with self.client.get(
            url,
            name="/c",
            headers={"User-Agent": BROWSER},
            allow_redirects=False,
            catch_response=True,
        ) as answer:
            if answer.status_code == 302:
                answer.success()
                tally[(*key, "click")] += 1
            else:
                answer.failure(f"{answer.status_code}")

    def malformed(self, key: Dimensions) -> None:
        """A pixel of the run's campaign with one bad value: answered, and never stored (if it
        were, verify would see an extra impression for the campaign). A bare ``%`` is not
        among them: the HTTP client re-encodes it as ``%25`` before it leaves."""
        bad = self.rng.choice(
            ["crid=" + "x" * 200, "crid=%C3%28", "aff=%ff%fe", "sub=%0A", f"cid={key.campaign}"]
        )
        path = f"/i.gif?cid={key.campaign}&{bad}&cb={self.rng.getrandbits(32)}"
        if self.get_gif(path, "/i.gif (malformed)"):
            tally[(*key, "rejected")] += 1


def _gate_and_write_tally(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    assert options is not None
    stats = environment.stats.total
    if stats.num_requests and stats.fail_ratio > options.max_fail_ratio:
        environment.process_exit_code = 1
    if stats.num_requests and stats.get_response_time_percentile(0.95) > options.max_p95_ms:
        environment.process_exit_code = 1
    if options.tally_dir and tally:
        folder = Path(options.tally_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [[*key, count] for key, count in tally.items()]
        (folder / f"tally-{run_id}-{os.getpid()}.json").write_bytes(orjson.dumps(rows))


events.init_command_line_parser.add_listener(_arguments)
events.quitting.add_listener(_gate_and_write_tally)
