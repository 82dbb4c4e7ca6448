"""What GIVT checking costs the pixel, on a realistic User-Agent mix.

    python -m loadtests.bench_givt            # 3 runs of 5 s each

It serves pixels from a real ``pixel-server`` (on a PostgreSQL cluster of its own) and drives it
with wrk, one connection pool cycling through the User-Agents below, weighted as real traffic is
(mostly a few browser versions, a tail of bots). In the same run it times ``givt.classify`` on the
same mix, in process, with a warm cache as the server has. It prints the server's requests/s,
its time per request, the classify time per request, and their ratio: the share of pixel
throughput that GIVT checking costs.
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

from loadtests.processes import PixelServer
from server import givt
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
