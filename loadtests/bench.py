"""Pixel throughput side by side: nginx ``empty_gif``, a minimal aiohttp app, pixel-server.

    python -m loadtests.bench                     # 3 rounds of 5 s each, one table
    python -m loadtests.bench --rounds 5 --seconds 10 --json bench.json

Each server gets one core (taskset), wrk gets another: ``wrk -t1 -c64`` over keep-alive
connections, the same realistic requests for all (50 creatives, a fresh cache-buster each time,
a browser User-Agent). The servers take turns, round after round (A B C A B C ...), so a noisy
machine slows them alike, and the table shows the median of the rounds: requests/s, p50 and
p99 latency, and the ratios to nginx and to the minimal aiohttp app. pixel-server runs as in
production: counting, flushing every second into a PostgreSQL cluster of its own.

``--workers 1 2 4 ...`` runs pixel-server with each number of workers, and nginx with as many
worker processes, for reference: N workers get N cores of their own and wrk the cores left, a
thread per core up to N, with 64 connections per worker; where no core is left (2 workers on
a 2-core machine), servers and wrk share every core and wrk runs one thread. It prints each
pixel-server run's scaling: its requests/s over N times one worker's, with nginx's beside it.

Then it runs the flush figures (``loadtests.bench_flush``: event-loop stall, a million keys
flushed, memory per key) and the counter engine's (``loadtests.bench_counters``), printing
theirs too; ``--json`` holds all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson

from loadtests.processes import PIXEL_SERVER, free_port
from server.config import positive_int
from server.embedded import EmbeddedPostgres

CONNECTIONS = 64  # wrk's connections per server process
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"
WRK_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/i.gif?cid=bench&crid=c" .. (n %% 50) .. "&aff=a&sub=s&cb=" .. n,
                    {["User-Agent"] = "%s"})
end
"""
NGINX_CONF = """
worker_processes {workers};
pid {folder}/nginx-{workers}.pid;
error_log {folder}/nginx-{workers}-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{ listen 127.0.0.1:{port} reuseport; location = /i.gif {{ empty_gif; }} }}
}}
"""


@dataclasses.dataclass
class Run:
    requests_per_second: float
    p50_ms: float
    p99_ms: float


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's server processes and wrk go, as taskset's core lists, and wrk's load."""

    servers: str
    wrk: str
    threads: int
    connections: int

    def __str__(self) -> str:
        return (
            f"server on {_cores(self.servers)}, wrk -t{self.threads} -c{self.connections}"
            f" on {_cores(self.wrk)}"
        )


def _cores(cores: str) -> str:
    return f"cores {cores}" if "," in cores else f"core {cores}"


def placement(cores: list[int], workers: int) -> Placement:
    """N workers on N cores of their own and wrk on the rest, a thread per core up to N; on
    every core, shared, with one wrk thread, where none is left for wrk."""
    connections = CONNECTIONS * workers
    if workers >= len(cores):
        every = ",".join(map(str, cores))
        return Placement(every, every, 1, connections)
    threads = min(len(cores) - workers, workers)
    return Placement(
        ",".join(map(str, cores[:workers])),
        ",".join(map(str, cores[workers : workers + threads])),
        threads,
        connections,
    )


def wrk(url: str, seconds: int, script: Path, where: Placement) -> Run:
    output = subprocess.run(
        [
            "taskset",
            "-c",
            where.wrk,
            "wrk",
            f"-t{where.threads}",
            f"-c{where.connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"\s50%\s+(\S+)", output)
    p99 = re.search(r"\s99%\s+(\S+)", output)
    if not (rate and p50 and p99) or "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw errors or printed something unexpected:\n{output}")
    return Run(float(rate[1]), _ms(p50[1]), _ms(p99[1]))


def wait_serving(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=1).read()
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer")


@contextlib.contextmanager
def started(command: list[str], url: str, log: Path, cores: str) -> Iterator[str]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["taskset", "-c", cores, *command],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                wait_serving(url)
            except TimeoutError:
                raise RuntimeError(f"{command[0]} did not start:\n{log.read_text()}") from None
            yield url
        finally:
            process.terminate()
            process.wait(30)


def nginx_command(folder: Path, port: int, workers: int) -> list[str]:
    """The command running nginx ``empty_gif`` with ``workers`` worker processes."""
    conf = folder / f"nginx-{workers}.conf"
    conf.write_text(NGINX_CONF.format(folder=folder, port=port, workers=workers))
    return ["nginx", "-c", str(conf), "-p", str(folder), "-g", "daemon off;"]


def run_name(server: str, workers: int) -> str:
    """A run's name in the table: the server's, with its workers when more than one."""
    return server if workers == 1 else f"{server} x{workers}"


def scaling(medians: dict[str, Run], workers: list[int]) -> dict[str, float]:
    """Each run of N > 1 workers' requests/s over N times one worker's: pixel-server's over
    its one worker's (if measured), nginx's over its one worker's."""
    efficiency = {}
    for n in workers:
        for server in ("nginx empty_gif", "pixel-server"):
            if n > 1 and server in medians:
                rate = medians[run_name(server, n)].requests_per_second
                efficiency[run_name(server, n)] = rate / (n * medians[server].requests_per_second)
    return efficiency


def engine_figures() -> dict[str, object]:
    """Runs the flush and counter benchmarks, each in a process of its own (memory per key is
    measured on a fresh heap); their output goes straight through. Returns their figures."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="pixel-bench-") as name:
        for label, module in (("flush", "bench_flush"), ("counters", "bench_counters")):
            print(f"\n== python -m loadtests.{module}", flush=True)
            path = Path(name) / f"{label}.json"
            command = [sys.executable, "-m", f"loadtests.{module}", "--json", str(path)]
            subprocess.run(command, check=True)
            figures[label] = orjson.loads(path.read_bytes())
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--seconds", type=positive_int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--workers",
        type=positive_int,
        nargs="+",
        default=[1],
        help="pixel-server worker counts to run",
    )
    parser.add_argument(
        "--http-only", action="store_true", help="skip the flush and counter engine figures"
    )
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is needed (Debian packages wrk, nginx-light, util-linux)")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        parser.error("two cores at least are needed: one for the server, one for wrk")
    # label -> (command, port, placement, workers), in the order they take turns
    servers: dict[str, tuple[list[str], int, Placement, int]] = {}
    with tempfile.TemporaryDirectory(prefix="pixel-bench-") as name:
        folder = Path(name)
        script = folder / "requests.lua"
        script.write_text(WRK_SCRIPT % BROWSER)
        nginx_port, aiohttp_port, pixel_port = free_port(), free_port(), free_port()
        postgres = EmbeddedPostgres(folder / "db")
        postgres.start()
        servers["nginx empty_gif"] = (
            nginx_command(folder, nginx_port, 1),
            nginx_port,
            placement(cores, 1),
            1,
        )
        servers["aiohttp minimal"] = (
            [sys.executable, "-m", "loadtests.reference_app", f"--port={aiohttp_port}"],
            aiohttp_port,
            placement(cores, 1),
            1,
        )
        for workers in args.workers:
            where = placement(cores, workers)
            if workers > 1:
                command = nginx_command(folder, nginx_port, workers)
                servers[run_name("nginx empty_gif", workers)] = (
                    command,
                    nginx_port,
                    where,
                    workers,
                )
            servers[run_name("pixel-server", workers)] = (
                [
                    PIXEL_SERVER,
                    "serve",
                    "--host=127.0.0.1",
                    f"--port={pixel_port}",
                    f"--admin-port={free_port()}",
                    f"--workers={workers}",
                    f"--dsn={postgres.dsn}",
                    f"--spool-dir={folder / 'spool'}",
                ],
                pixel_port,
                where,
                workers,
            )
        results: dict[str, list[Run]] = {label: [] for label in servers}
        try:
            for round_number in range(args.rounds):
                for label, (command, port, where, _) in servers.items():
                    url = f"http://127.0.0.1:{port}"
                    with started(command, url + "/i.gif", folder / f"{label}.log", where.servers):
                        wrk(url, 1, script, where)  # warm-up
                        results[label].append(wrk(url, args.seconds, script, where))
                print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            postgres.stop()

    medians = {
        label: Run(
            *(
                statistics.median(getattr(run, field.name) for run in runs)
                for field in dataclasses.fields(Run)
            )
        )
        for label, runs in results.items()
    }
    minimal = medians["aiohttp minimal"]
    print(f"{args.seconds} s per run, median of {args.rounds} alternating rounds; wrk for each:")
    for workers in sorted({1, *args.workers}):
        where = placement(cores, workers)
        few = "" if where.threads >= workers else " (fewer threads than workers: see nginx's)"
        print(f"  {workers} worker{'s' if workers > 1 else ''}: {where}{few}")
    print("vs nginx: against nginx empty_gif with as many workers")
    header = ("server", "requests/s", "p50 ms", "p99 ms", "vs nginx", "vs aiohttp")
    print("{:<21}{:>12}{:>9}{:>9}{:>10}{:>12}".format(*header))
    for label, run in medians.items():
        reference = medians[run_name("nginx empty_gif", servers[label][3])]
        print(
            f"{label:<21}{run.requests_per_second:>12,.0f}{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}"
            f"{run.requests_per_second / reference.requests_per_second:>9.2f}x"
            f"{run.requests_per_second / minimal.requests_per_second:>11.2f}x"
        )
    efficiency = scaling(medians, args.workers)
    if efficiency:
        print("scaling: requests/s over N times one worker's (one nginx worker's for nginx)")
        for label, share in efficiency.items():
            print(f"  {label:<21}{share:>6.0%}")
    figures = {} if args.http_only else engine_figures()
    if args.json:
        args.json.write_bytes(
            orjson.dumps(
                {
                    "medians": {k: dataclasses.asdict(v) for k, v in medians.items()},
                    "runs": {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()},
                    "rounds": args.rounds,
                    "seconds": args.seconds,
                    "placements": {
                        label: dataclasses.asdict(where)
                        for label, (_, _, where, _) in servers.items()
                    },
                    "scaling": efficiency,
                    **figures,
                },
                option=orjson.OPT_INDENT_2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
