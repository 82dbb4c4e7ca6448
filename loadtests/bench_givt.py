"""What GIVT checking costs the pixel, on a realistic User-Agent mix.

    python -m loadtests.bench_givt            # 3 runs of 5 s each

It serves pixels from a real ``pixel-server`` (on a PostgreSQL cluster of its own) and drives it
with wrk, one connection pool cycling through the User-Agents below, weighted as real traffic is
(mostly a few browser versions, a tail of bots). In the same run it times ``givt.classify`` on the
same mix, in process, with a warm cache as the server has. It prints the server's requests/s,
its time per request, the classify time per request, and their ratio: the share of pixel
throughput that GIVT checking costs. Then it times the worst it knows of, User-Agents of
8,000 bytes (a header line's most) that no cache holds, against CrawlerDetect's own matching
of the same patterns.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

from crawlerdetect import CrawlerDetect

from loadtests.processes import PixelServer
from server import givt
from server.config import positive_int
from server.embedded import EmbeddedPostgres

# (weight, User-Agent): browsers dominate, bots and tools are the tail.
USER_AGENTS = [
    (int(weight), agent)
    for weight, _, agent in (
        line.partition("\t")
        for line in (Path(__file__).parent / "user_agents.tsv").read_text().splitlines()
        if line and not line.startswith("#")
    )
]
MIX = [agent for weight, agent in USER_AGENTS for _ in range(weight)]

WRK_SCRIPT = """
local agents = {%s}
local n = 0
request = function()
  n = n + 1
  local headers = {["User-Agent"] = agents[(n %% #agents) + 1]}
  return wrk.format("GET", "/i.gif?cid=bench&crid=c" .. (n %% 50) .. "&cb=" .. n, headers)
end
"""


def wrk(url: str, seconds: int, script: Path) -> float:
    """requests/s of one wrk run: one thread, 64 keep-alive connections."""
    output = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    return float(match[1])


def classify_seconds() -> float:
    """Seconds per classify() on the mix, warm cache, best of 5."""
    headers = [{"User-Agent": agent} for agent in MIX]
    for header in headers:
        givt.classify(header)
    loops = 200
    best = min(timeit.repeat(lambda: [givt.classify(h) for h in headers], number=loops, repeat=5))
    return best / (loops * len(headers))


# Long runs of the characters a bot pattern's prefix repeats, and of a common token.
LONG_USER_AGENTS = {
    "8,000 letters": "a" * 8000,
    "8,000 digits": "1" * 8000,
    '"Mozilla/5.0 " to 8,000 bytes': ("Mozilla/5.0 " * 667)[:8000],
}


def worst_case_milliseconds(user_agent: str) -> tuple[float, float]:
    """Milliseconds to classify ``user_agent`` uncached: givt's, CrawlerDetect's; best of 3."""
    reference = CrawlerDetect()
    ours = min(timeit.repeat(lambda: givt._is_crawler(user_agent), number=1, repeat=3))
    theirs = min(timeit.repeat(lambda: reference._check_crawler(user_agent), number=1, repeat=3))
    return ours * 1000, theirs * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--seconds", type=positive_int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pixel-bench-givt-") as folder:
        workdir = Path(folder)
        script = workdir / "mix.lua"
        script.write_text(WRK_SCRIPT % ", ".join(f'"{agent}"' for agent in MIX))
        postgres = EmbeddedPostgres(workdir / "db")
        postgres.start()
        server = PixelServer(workdir / "server.log", f"--dsn={postgres.dsn}")
        try:
            rates, costs = [], []
            for _ in range(args.runs):
                rates.append(wrk(server.base_url, args.seconds, script))
                costs.append(classify_seconds())
        finally:
            server.terminate()
            postgres.stop()
    rate, cost = statistics.median(rates), statistics.median(costs)
    per_request = 1 / rate
    print(f"User-Agent mix: {len(USER_AGENTS)} distinct, {len(MIX)} weighted entries")
    print(f"pixel-server      {rate:>10,.0f} requests/s  {per_request * 1e6:8.2f} us/request")
    print(f"givt.classify     {cost * 1e6:>29.3f} us/request (warm cache)")
    print(f"GIVT share of pixel time: {cost / per_request:.2%} (median of {args.runs} runs)")
    for name, user_agent in LONG_USER_AGENTS.items():
        ours, theirs = worst_case_milliseconds(user_agent)
        print(f"uncached, {name}: {ours:.2f} ms (CrawlerDetect's own matching: {theirs:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
