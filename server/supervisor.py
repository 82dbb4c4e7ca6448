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

from server.app import make_admin_app
from server.config import SETTINGS, Config
from server.metrics import Snapshot, merge

log = logging.getLogger(__name__)

# Set by the supervisor for its workers: where a worker serves its private admin app.
WORKER_SOCKET = "PIXEL_WORKER_ADMIN_SOCKET"
# How often the supervisor looks for dead workers; how long a worker may take to start.
CHECK_INTERVAL = 1.0
START_TIMEOUT = 30.0


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
    return environment


class Supervisor:
    def __init__(self, config: Config, dsn: str) -> None:
        self._config = config
        self._dsn = dsn
        self._run_dir = Path(tempfile.mkdtemp(prefix="pixel-workers-"))
        self._workers: list[asyncio.subprocess.Process | None] = [None] * config.workers

    def _socket(self, index: int) -> Path:
        return self._run_dir / f"worker-{index}.sock"

    async def _start(self, index: int) -> None:
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
        deadline = loop.time() + START_TIMEOUT
        while not socket.exists() and worker.returncode is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if socket.exists():
            log.info("worker %d ready (pid %d)", index, worker.pid)

    async def _gather(self) -> Snapshot:
        """Every live worker's metrics, merged."""
        snapshots = []
        for index in range(len(self._workers)):
            connector = aiohttp.UnixConnector(path=str(self._socket(index)))
            with contextlib.suppress(OSError, aiohttp.ClientError, asyncio.TimeoutError):
                async with (
                    aiohttp.ClientSession(connector=connector) as session,
                    session.get(
                        "http://worker/metrics.json", timeout=aiohttp.ClientTimeout(2)
                    ) as answer,
                ):
                    snapshots.append(orjson.loads(await answer.read()))
        return merge(snapshots)

    async def run(self) -> int:
        """Supervises until SIGTERM or SIGINT; returns the exit status."""
        config = self._config
        admin = make_admin_app(config, self._dsn, self._gather)
        admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None)
        await admin_runner.setup()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        try:
            try:
                await web.TCPSite(admin_runner, config.admin_host, config.admin_port).start()
            except OSError as error:
                log.error("cannot listen: %s", error)
                return 1
            for index in range(config.workers):
                await self._start(index)
            log.info(
                "%d workers serving pixels on http://%s:%d, admin on http://%s:%d",
                config.workers,
                config.host,
                config.port,
                config.admin_host,
                config.admin_port,
            )
            while not stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), CHECK_INTERVAL)
                for index, worker in enumerate(self._workers):
                    if (
                        worker is not None
                        and worker.returncode is not None
                        and not stopping.is_set()
                    ):
                        log.error(
                            "worker %d (pid %d) exited with status %d; restarting it",
                            index,
                            worker.pid,
                            worker.returncode,
                        )
                        await self._start(index)
            log.info("stopping: passing the signal to %d workers", config.workers)
            return await self._stop_workers()
        finally:
            await admin_runner.cleanup()
            shutil.rmtree(self._run_dir, ignore_errors=True)

    async def _stop_workers(self) -> int:
        workers = [worker for worker in self._workers if worker is not None]
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
        failed = [worker.pid for worker in workers if worker.returncode != 0]
        if failed or late:
            log.error("workers %s did not stop cleanly", failed)
            return 1
        return 0


def snapshot_route(admin: web.Application, snapshot: Any) -> None:
    """A worker's ``/metrics.json``: its own metrics snapshot, for the supervisor to merge."""

    async def metrics_json(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(snapshot()), content_type="application/json")

    admin.router.add_get("/metrics.json", metrics_json)
