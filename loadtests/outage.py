"""Fault injection: PostgreSQL stopped for a while under steady pixel load.

    python -m loadtests.outage                      # 10 s outage at 800 requests/s
    python -m loadtests.outage --outage 30 --rate 1500

It starts a PostgreSQL cluster of its own (the embedded binaries) and a ``pixel-server``, sends
paced pixel requests, stops PostgreSQL (a real fast shutdown), starts it again, lets the server
catch up, stops it with SIGTERM and reconciles every answered request with ``pixel_counts``.
It prints sent / stored / extra / lost and the pixel latency before, during and after the
outage, and exits 1 unless lost and extra are both 0 (extra: stored beyond what was answered,
counted twice or never sent).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from loadtests.accounting import Key, Reconciliation, reconcile, totals_by_key
from loadtests.processes import PixelServer
from server.embedded import EmbeddedPostgres

PHASES = ("before", "during", "after")
CLIENTS = 16


@dataclasses.dataclass
class OutageReport:
    impressions: Reconciliation
    latencies: dict[str, list[float]]
    failed_requests: int

    def percentile(self, phase: str, fraction: float) -> float:
        samples = sorted(self.latencies[phase])
        if not samples:
            return float("nan")
        return samples[min(len(samples) - 1, int(fraction * len(samples)))]

    def lines(self) -> list[str]:
        result = self.impressions
        lines = [
            f"sent        {result.sent}",
            f"stored      {result.stored}",
            f"extra       {result.extra}",
            f"lost        {result.missing}",
            f"failed      {self.failed_requests} (requests not answered 200 with the GIF)",
            "pixel latency, ms   requests      p50      p99",
        ]
        for phase in PHASES:
            p50, p99 = (self.percentile(phase, q) * 1000 for q in (0.5, 0.99))
            lines.append(f"  {phase:<17} {len(self.latencies[phase]):>8} {p50:>8.2f} {p99:>8.2f}")
        return lines


async def run(
    workdir: Path, outage: float, rate: float, before: float, after: float
) -> OutageReport:
    """Runs the scenario in ``workdir``; everything it starts is stopped before it returns."""
    postgres = EmbeddedPostgres(workdir / "db")
    postgres.start()
    server = PixelServer(
        workdir / "server.log",
        f"--dsn={postgres.dsn}",
        "--flush-interval=0.2",
        f"--spool-dir={workdir / 'spool'}",
    )
    answered: collections.Counter[Key] = collections.Counter()
    latencies: dict[str, list[float]] = {phase: [] for phase in PHASES}
    failed = 0
    phase = "before"
    loading = True

    async def client(session: aiohttp.ClientSession, number: int) -> None:
        nonlocal failed
        interval = CLIENTS / rate
        due = time.monotonic() + number * interval / CLIENTS
        sent = 0
        while loading:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due += interval
            key = (f"outage-{number % 4}", f"creative-{sent % 25}", f"aff-{number}", "")
            url = f"{server.base_url}/i.gif?cid={key[0]}&crid={key[1]}&aff={key[2]}&cb={sent}"
            started, label = time.monotonic(), phase
            try:
                async with session.get(url) as answer:
                    ok = answer.status == 200 and len(await answer.read()) == 43
            except aiohttp.ClientError:
                ok = False
            if ok:
                answered[key] += 1
                latencies[label].append(time.monotonic() - started)
            else:
                failed += 1
            sent += 1

    try:
        headers = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) pixel-server outage program"}
        async with aiohttp.ClientSession(headers=headers) as session:
            load = asyncio.gather(*(client(session, n) for n in range(CLIENTS)))
            await asyncio.sleep(before)
            phase = "during"
            await asyncio.to_thread(postgres.stop)
            await asyncio.sleep(outage)
            await asyncio.to_thread(postgres.start)
            phase = "after"
            await asyncio.sleep(after)
            loading = False
            await load
        await asyncio.to_thread(_wait_ready, server.base_url, 60.0)
        status = await asyncio.to_thread(server.terminate)
        if status != 0:
            raise RuntimeError(f"pixel-server exited with {status}:\n{server.log()}")
        stored = {key: counts[0] for key, counts in (await totals_by_key(postgres.dsn)).items()}
    finally:
        server.kill()
        postgres.stop()
    return OutageReport(reconcile(answered, stored), latencies, failed)


def _wait_ready(base_url: str, timeout: float) -> None:
    """Waits until /readyz says the server has caught up with the database."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base_url + "/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("pixel-server did not catch up with the database")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=10.0, help="seconds PostgreSQL is down")
    parser.add_argument("--rate", type=float, default=800.0, help="pixel requests per second")
    parser.add_argument("--before", type=float, default=5.0, help="seconds of load before")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of load after")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pixel-outage-") as workdir:
        report = asyncio.run(run(Path(workdir), args.outage, args.rate, args.before, args.after))
    print("\n".join(report.lines()))
    return 0 if report.impressions.exact and report.failed_requests == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
