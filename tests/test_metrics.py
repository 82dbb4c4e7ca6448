"""/metrics: what a real server reports, in a format Prometheus' own parser reads, and the merge
of several processes' snapshots that ``--workers`` reports through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.loop_lag import LoopLag
from server.metrics import Histogram, Metrics, merge, render, value
from tests.harness import DatabaseProxy, PixelServer, scrape
from tests.raw_http import exchange, status_codes

BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36"}
BOT = {"User-Agent": "Googlebot/2.1 (+http://www.google.com/bot.html)"}


def parsed(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> labels -> value, as Prometheus' client library parses the text."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_server_reports_requests_events_and_flushes(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.1")
    base = server.base_url
    before = parsed(await scrape(server))["pixel_requests_total"]  # the harness polled /healthz
    # One keep-alive session: later requests on a connection may take the pixel's fast path.
    async with aiohttp.ClientSession(headers=BROWSER) as session:
        for _ in range(5):
            async with session.get(f"{base}/i.gif?cid=m1&crid=a") as answer:
                assert answer.status == 200
        async with session.head(f"{base}/i.gif?cid=m1") as answer:
            assert answer.status == 200
        async with session.get(f"{base}/i.gif?cid=m1", headers=BOT) as answer:
            assert answer.status == 200
        async with session.get(f"{base}/i.gif?cid=%ff") as answer:  # invalid UTF-8: rejected
            assert answer.status == 200
        for event in ("m", "m", "v"):
            async with session.post(f"{base}/v.gif?e={event}&cid=m1&crid=a") as answer:
                assert answer.status == 204
        async with session.get(f"{base}/v.js") as answer:
            assert answer.status == 200
        async with session.get(f"{base}/c?cid=m1") as answer:  # no --secret: 400, rejected
            assert answer.status == 400
        async with session.get(f"{base}/healthz") as answer:
            assert answer.status == 200

    async def flushed() -> bool:
        """Sealed (the events are counted then) and applied."""
        found = parsed(await scrape(server))
        viewable = found["pixel_events_total"][(("endpoint", "/v.gif"), ("type", "viewable"))]
        return viewable == 1 and found["pixel_pending_batches"][()] == 0

    await wait_until(flushed)
    text = await scrape(server)
    found = parsed(text)

    def one(name: str, **labels: str) -> float:
        return found[name][tuple(sorted(labels.items()))]

    requests = {
        labels[0][1]: count - before[labels]
        for labels, count in found["pixel_requests_total"].items()
    }
    assert requests == {"/i.gif": 8, "/v.gif": 3, "/v.js": 1, "/c": 1, "/healthz": 1, "/readyz": 0}
    assert one("pixel_events_total", endpoint="/i.gif", type="impression") == 5
    assert one("pixel_events_total", endpoint="/i.gif", type="givt_impression") == 1
    assert one("pixel_events_total", endpoint="/v.gif", type="measurable") == 2
    assert one("pixel_events_total", endpoint="/v.gif", type="viewable") == 1
    assert one("pixel_events_total", endpoint="/c", type="click") == 0
    assert one("pixel_rejected_requests_total", reason="invalid_utf8") == 1
    assert one("pixel_rejected_requests_total", reason="clicks_disabled") == 1
    assert one("pixel_givt_requests_total", reason="known_bot") == 1
    flushes = one("pixel_flushes_total")
    assert flushes >= 1
    assert one("pixel_flush_failures_total") == 0
    # Histograms: one observation per batch applied, buckets cumulative up to +Inf.
    assert one("pixel_flush_duration_seconds_count") == flushes
    assert one("pixel_flush_duration_seconds_bucket", le="+Inf") == flushes
    assert one("pixel_flush_duration_seconds_sum") > 0
    assert one("pixel_flush_rows_count") == flushes
    assert one("pixel_flush_rows_sum") == one("pixel_flushed_rows_total")
    buckets = [count for _, count in sorted(found["pixel_flush_rows_bucket"].items(), key=_le)]
    assert buckets == sorted(buckets)
    assert time.time() - 60 < one("pixel_last_flush_timestamp_seconds") <= time.time()
    assert one("pixel_spool_batches") == one("pixel_spool_bytes") == 0
    assert one("pixel_spool_max_bytes") == 1 << 30
    assert one("pixel_dropped_rows_total") == one("pixel_dead_lettered_batches_total") == 0
    assert one("pixel_flusher_ready") == 1
    assert one("pixel_keys") >= 0
    assert 0 <= one("pixel_event_loop_lag_seconds") <= one("pixel_event_loop_lag_max_seconds") < 1
    assert one("process_resident_memory_bytes") > 10_000_000
    assert one("process_cpu_seconds_total") > 0
    # Counters end in _total.
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line
    assert server.terminate() == 0


@pytest.mark.parametrize("flags", [(), ("--access-log",)])
async def test_requests_the_http_parser_refuses_are_counted(
    pixel_server: Callable[..., PixelServer], database: str, flags: tuple[str, ...]
) -> None:
    """No handler sees a request aiohttp's parser refuses: the server counts the 400s it
    answers by itself, on the pixel's fast path and on aiohttp's own (as with an access
    log)."""
    server = pixel_server(f"--dsn={database}", *flags)
    broken = [
        b"GET /i.gif HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /i.gif?cid=\xff\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"FOO BAR\r\n\r\n",
    ]
    for request in broken:
        answer = await asyncio.to_thread(exchange, server.port, request, 2.0)
        assert status_codes(answer) == [400]
    # After a pixel answered on the same connection.
    pixel = b"GET /i.gif?cid=ok HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await asyncio.to_thread(exchange, server.port, [pixel, broken[0]], 2.0)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"GIF89a" in answer
    assert answer.count(b"HTTP/1.") == 2 and b"\r\n\r\nInvalid header token" in answer
    found = parsed(await scrape(server))
    assert found["pixel_http_errors_total"] == {(("status", "400"),): 4}
    assert server.terminate() == 0


async def test_failing_flushes_and_the_spool_show_while_the_database_is_down(
    pixel_server: Callable[..., PixelServer], database: str
) -> None:
    proxy = DatabaseProxy(database)  # not opened: the database is unreachable
    server = pixel_server(f"--dsn={proxy.dsn()}", "--flush-interval=0.1")
    async with (
        aiohttp.ClientSession(headers=BROWSER) as session,
        session.get(f"{server.base_url}/i.gif?cid=down") as answer,
    ):
        assert answer.status == 200

    async def spooled() -> bool:
        found = parsed(await scrape(server))
        return found["pixel_spool_batches"][()] >= 1

    await wait_until(spooled)
    found = parsed(await scrape(server))
    assert found["pixel_flush_failures_total"][()] >= 1
    assert found["pixel_flusher_ready"][()] == 0
    assert found["pixel_spool_bytes"][()] > 0
    assert found["pixel_flushes_total"][()] == 0
    assert server.terminate() == 0


def _le(item: tuple[tuple[tuple[str, str], ...], float]) -> float:
    return float(dict(item[0])["le"])


def test_snapshots_of_several_processes_merge_into_one_report() -> None:
    one, two = Metrics(), Metrics()
    one.requests["/i.gif"] += 3
    two.requests["/i.gif"] += 4
    two.requests["/c"] += 1
    one.rejected["too_long"] += 1
    two.rejected["invalid_utf8"] += 2
    one.events[0] += 10
    two.events[0] += 5
    one.flushed(rows=10, seconds=0.004)
    two.flushed(rows=2_000, seconds=0.2)
    two.flushed(rows=1, seconds=0.004)
    one.gauge("pixel_keys", "keys", lambda: 7)
    two.gauge("pixel_keys", "keys", lambda: 5)
    one.gauge("pixel_flusher_ready", "ready", lambda: 1, "min")
    two.gauge("pixel_flusher_ready", "ready", lambda: 0, "min")
    one.gauge("pixel_event_loop_lag_max_seconds", "lag", lambda: 0.25, "max")
    two.gauge("pixel_event_loop_lag_max_seconds", "lag", lambda: 0.5, "max")
    # A snapshot is plain data: it crosses a process boundary as JSON.
    snapshots = [orjson.loads(orjson.dumps(m.snapshot())) for m in (one, two)]
    merged = merge(snapshots)

    assert value(merged, "pixel_requests_total", "/i.gif") == 7
    assert value(merged, "pixel_requests_total", "/c") == 1
    assert value(merged, "pixel_rejected_requests_total", "too_long") == 1
    assert value(merged, "pixel_rejected_requests_total", "invalid_utf8") == 2
    assert value(merged, "pixel_events_total", "/i.gif", "impression") == 15
    assert value(merged, "pixel_flushes_total") == 3
    assert value(merged, "pixel_flushed_rows_total") == 2_011
    assert value(merged, "pixel_keys") == 12  # sum
    assert value(merged, "pixel_flusher_ready") == 0  # min: one worker is not ready
    assert value(merged, "pixel_event_loop_lag_max_seconds") == 0.5  # max
    assert value(merged, "process_start_time_seconds") == min(one.started, two.started)
    found = parsed(render(merged))
    assert found["pixel_flush_duration_seconds_count"][()] == 3
    assert found["pixel_flush_duration_seconds_bucket"][(("le", "0.005"),)] == 2
    assert found["pixel_flush_duration_seconds_bucket"][(("le", "0.25"),)] == 3
    assert found["pixel_flush_duration_seconds_sum"][()] == pytest.approx(0.208)
    assert found["pixel_flush_rows_bucket"][(("le", "10.0"),)] == 2
    assert found["pixel_flush_rows_bucket"][(("le", "10000.0"),)] == 3
    # One process's snapshot merged alone is itself.
    snapshot = one.snapshot()
    assert merge([snapshot]) == snapshot


def test_histograms_with_other_buckets_do_not_merge() -> None:
    one, two = Metrics(), Metrics()
    two.flush_rows = Histogram((1, 2, 3))
    with pytest.raises(ValueError, match="pixel_flush_rows"):
        merge([one.snapshot(), two.snapshot()])


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    histogram = Histogram((0.1, 1))
    for observed in (0.1, 0.5, 1, 2):
        histogram.observe(observed)
    assert histogram.counts == [1, 2, 1]
    assert histogram.sum == pytest.approx(3.6)


def test_label_values_and_help_are_escaped() -> None:
    instance = Metrics()
    instance.rejected['a"b\\c\nd'] += 1
    found = parsed(instance.render())
    assert found["pixel_rejected_requests_total"][(("reason", 'a"b\\c\nd'),)] == 1


def test_the_loop_lag_keeps_the_largest_of_its_window() -> None:
    lag = LoopLag(interval=0.25, window=60)
    lag.record(now=0.0, lag=0.3)
    lag.record(now=30.0, lag=0.01)
    assert (lag.last, lag.max) == (0.01, 0.3)
    lag.record(now=61.0, lag=0.02)  # the 0.3 is older than the window now
    assert (lag.last, lag.max) == (0.02, 0.02)
