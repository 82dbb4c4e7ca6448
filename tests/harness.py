"""Real processes for the tests: a ``pixel-server serve`` subprocess and database helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg

PIXEL_SERVER = str(Path(sys.executable).parent / "pixel-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def with_database(dsn: str, name: str) -> str:
    """The same server's DSN for database ``name``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


class PixelServer:
    """A ``pixel-server serve`` process on free loopback ports, its log in a file."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [
            PIXEL_SERVER,
            "serve",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--admin-port={self.admin_port}",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.wait_until_serving()

    def wait_until_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pixel-server exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"pixel-server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then waits for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


async def fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    connection = await asyncpg.connect(dsn)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


async def totals_by_key(dsn: str) -> dict[tuple[str, str, str, str], tuple[int, ...]]:
    """The counters of ``pixel_counts`` summed per key over all buckets."""
    rows = await fetch(
        dsn,
        "SELECT campaign, creative, affiliate, sub_id, sum(impressions)::bigint,"
        " sum(givt_impressions)::bigint, sum(measurable)::bigint, sum(viewable)::bigint,"
        " sum(clicks)::bigint, sum(givt_clicks)::bigint"
        " FROM pixel_counts GROUP BY 1, 2, 3, 4",
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


class DatabaseProxy:
    """A TCP proxy in front of the test PostgreSQL, to cut the database off and bring it back.

    While closed, connections to its port are refused, as they are when a database is down.
    """

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self.port = free_port()
        self._database = parts.path.lstrip("/")
        options = dict(parse_qsl(parts.query))
        port = parts.port or int(options.get("port", 5432))
        self._tcp = (parts.hostname, port) if parts.hostname else None
        self._unix = f"{options.get('host', '/tmp')}/.s.PGSQL.{port}"
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()

    def dsn(self, password: str = "") -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://postgres{secret}@127.0.0.1:{self.port}/{self._database}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def close(self) -> None:
        """Stops listening and cuts every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            if self._tcp is not None:
                up_reader, up_writer = await asyncio.open_connection(*self._tcp)
            else:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (asyncio.CancelledError, OSError):
            pass  # cut by close(), or the database went away: the client sees the drop
        finally:
            writer.close()
            self._links.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
