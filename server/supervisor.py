"""``--workers N``: N processes answer on one port, each counting and flushing its own share.

The supervisor starts the workers (``pixel-server serve`` processes that bind the pixel port
with SO_REUSEPORT, so the kernel spreads connections among them), restarts one that dies, and on
SIGTERM or SIGINT passes the signal on and waits, so every worker answers what it has in flight
and makes its final flush. It owns the admin port: ``/metrics`` and the operator page cover
every worker, whose own metrics it fetches over a private Unix socket each (``/metrics.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from server import signals
from server.app import make_admin_app
from server.config import SETTINGS, Config
from server.metrics import Snapshot, merge

log = logging.getLogger(__name__)

# Set by the supervisor for its workers: where a worker serves its private admin app, and the
# supervisor's pid, whose death stops the worker.
WORKER_SOCKET = "PIXEL_WORKER_ADMIN_SOCKET"
SUPERVISOR_PID = "PIXEL_SUPERVISOR_PID"
# How often the supervisor looks for dead workers (and takes their metrics); how long a worker
# may take to start.
CHECK_INTERVAL = 1.0
START_TIMEOUT = 30.0
# A worker that dies again and again is restarted after 1, 2, 4 ... seconds, at most this
# many; one that ran this long since its start is restarted at once.
RESTART_DELAY_CAP = 30.0
STEADY_SECONDS = 60.0


def worker_environment(config: Config, dsn: str, socket: Path) -> dict[str, str]:
    """The environment of a worker: the supervisor's settings, one worker, the given DSN."""
    environment = dict(os.environ)
    for setting in SETTINGS:
        value = getattr(config, setting.name)
        if isinstance(value, tuple):
            text = ",".join(value)
        elif value is None:
            text = ""
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        environment[setting.env] = text
    environment["PIXEL_DSN"] = dsn
    environment["PIXEL_WORKERS"] = "1"
    environment[WORKER_SOCKET] = str(socket)
    environment[SUPERVISOR_PID] = str(os.getpid())
    return environment


def stop_with_supervisor() -> None:
    """In a worker: has the kernel send it SIGTERM when the supervisor dies (Linux), so that a
    supervisor killed outright leaves no worker serving the port unsupervised. A supervisor
    gone already, before the request, gets the same answer."""
    supervisor = int(os.environ[SUPERVISOR_PID])
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning(
                "cannot ask to be stopped with the supervisor: %s", os.strerror(ctypes.get_errno())
            )
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Supervisor:
    def __init__(self, config: Config, dsn: str) -> None:
        self._config = config
        self._dsn = dsn
        self._run_dir = Path(tempfile.mkdtemp(prefix="pixel-workers-"))
        self._workers: list[asyncio.subprocess.Process | None] = [None] * config.workers
        self._ready = [False] * config.workers  # each worker's latest start got ready
        self._started_at = [0.0] * config.workers
        self._failures = [0] * config.workers  # deaths in a row, each soon after its start
        self._restart_at: list[float | None] = [None] * config.workers
        # Each worker's metrics as last taken, and the counters of workers that died: added
        # in, so that the merged counters never go back when one dies or misses a scrape.
        self._last: list[Snapshot | None] = [None] * config.workers
        self._departed: Snapshot = {}

    def _socket(self, index: int) -> Path:
        return self._run_dir / f"worker-{index}.sock"

    async def _start(self, index: int, stopping: asyncio.Event) -> bool:
        """Starts worker ``index``; whether it got ready (it is not waited for once
        ``stopping`` is set)."""
        socket = self._socket(index)
        socket.unlink(missing_ok=True)
        self._workers[index] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            env=worker_environment(self._config, self._dsn, socket),
        )
        worker = self._workers[index]
        assert worker is not None
        # A worker is ready once it serves its admin socket, which it opens after the pixel port.
        loop = asyncio.get_running_loop()
        self._started_at[index] = loop.time()
        deadline = loop.time() + START_TIMEOUT
        while (
            not socket.exists()
            and worker.returncode is None
            and loop.time() < deadline
            and not stopping.is_set()
        ):
            await asyncio.sleep(0.05)
        self._ready[index] = socket.exists()
        if self._ready[index]:
            log.info("worker %d ready (pid %d)", index, worker.pid)
        return self._ready[index]

    async def _snapshot(self, index: int) -> None:
        """Takes worker ``index``'s metrics; one that does not answer keeps its last."""
        connector = aiohttp.UnixConnector(path=str(self._socket(index)))
        with contextlib.suppress(OSError, aiohttp.ClientError, asyncio.TimeoutError):
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(
                    "http://worker/metrics.json", timeout=aiohttp.ClientTimeout(2)
                ) as answer,
            ):
                self._last[index] = orjson.loads(await answer.read())

    async def _take_snapshots(self) -> None:
        await asyncio.gather(*(self._snapshot(index) for index in range(len(self._workers))))

    async def _gather(self) -> Snapshot:
        """Every worker's metrics, merged, with the counters of those that died."""
        await self._take_snapshots()
        return merge([*(last for last in self._last if last is not None), self._departed])

    def _departs(self, index: int) -> None:
        """Keeps the counters a dead worker had counted when its metrics were last taken (at
        most a check interval before it died); its gauges go with it."""
        last, self._last[index] = self._last[index], None
        if last is not None:
            kept = {name: family for name, family in last.items() if family["type"] != "gauge"}
            self._departed = merge([self._departed, kept])

    async def _look_after(self, index: int, stopping: asyncio.Event) -> None:
        """Restarts worker ``index`` if it died, after a delay that doubles while it keeps
        dying soon after its start."""
        worker = self._workers[index]
        loop = asyncio.get_running_loop()
        if worker is not None and worker.returncode is not None and self._restart_at[index] is None:
            self._departs(index)
            steady = loop.time() - self._started_at[index] >= STEADY_SECONDS
            self._failures[index] = 0 if steady else self._failures[index] + 1
            delay = 0.0 if steady else min(RESTART_DELAY_CAP, 2.0 ** (self._failures[index] - 1))
            self._restart_at[index] = loop.time() + delay
            log.error(
                "worker %d (pid %d) exited with status %d; restarting it in %.0f s",
                index,
                worker.pid,
                worker.returncode,
                delay,
            )
        restart_at = self._restart_at[index]
        if restart_at is not None and loop.time() >= restart_at and not stopping.is_set():
            self._restart_at[index] = None
            await self._start(index, stopping)

    async def run(self, received: list[int]) -> int:
        """Supervises until SIGTERM or SIGINT (or at once for one ``received`` before, as
        :func:`server.signals.noted` notes them); returns the exit status."""
        config = self._config
        admin = make_admin_app(config, self._dsn, self._gather)
        admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None)
        await admin_runner.setup()
        stopping = asyncio.Event()
        signals.stop_on_signals(stopping, received)
        try:
            try:
                await web.TCPSite(admin_runner, config.admin_host, config.admin_port).start()
            except OSError as error:
                log.error("cannot listen: %s", error)
                return 1
            for index in range(config.workers):
                if stopping.is_set():  # SIGTERM while starting: stop those started
                    break
                if not await self._start(index, stopping) and not stopping.is_set():
                    # As a single server does when it cannot start: stop, and say so.
                    log.error("worker %d did not start; stopping", index)
                    await self._stop_workers()
                    return 1
            if not stopping.is_set():
                log.info(
                    "%d workers serving pixels on http://%s:%d, admin on http://%s:%d",
                    config.workers,
                    config.host,
                    config.port,
                    config.admin_host,
                    admin_runner.addresses[0][1],  # the port bound: port 0 leaves it to the system
                )
            while not stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), CHECK_INTERVAL)
                await self._take_snapshots()
                for index in range(config.workers):
                    await self._look_after(index, stopping)
            started = sum(worker is not None for worker in self._workers)
            log.info("stopping: passing the signal to %d workers", started)
            return await self._stop_workers()
        finally:
            await admin_runner.cleanup()
            shutil.rmtree(self._run_dir, ignore_errors=True)

    async def _stop_workers(self) -> int:
        workers = [worker for worker in self._workers if worker is not None]
        if not workers:  # stopped before the first started
            return 0
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
        # Each worker keeps its own shutdown timeout; a little more for the process itself.
        waiting = [asyncio.create_task(worker.wait()) for worker in workers]
        _, late = await asyncio.wait(waiting, timeout=self._config.shutdown_timeout + 5)
        for worker in workers:
            if worker.returncode is None:
                log.error("worker pid %d did not stop in time; killing it", worker.pid)
                worker.kill()
        await asyncio.gather(*waiting, return_exceptions=True)
        failed = [
            worker.pid
            for worker, ready in zip(self._workers, self._ready, strict=True)
            if worker is not None
            and worker.returncode != 0
            # Signalled while it started, before it heeds signals: it had counted nothing.
            and not (worker.returncode == -signal.SIGTERM and not ready)
        ]
        if failed or late:
            log.error("workers %s did not stop cleanly", failed)
            return 1
        return 0


def snapshot_route(admin: web.Application, snapshot: Any) -> None:
    """A worker's ``/metrics.json``: its own metrics snapshot, for the supervisor to merge."""

    async def metrics_json(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(snapshot()), content_type="application/json")

    admin.router.add_get("/metrics.json", metrics_json)
