"""The ``pixel-server`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from server import config as settings
from server import logs
from server.app import make_admin_app, make_app
from server.config import Config
from server.dsn import redact
from server.embedded import EmbeddedPostgres

log = logging.getLogger("server")

# Pixel requests need no more than this: a long request line is an attack or a bug.
MAX_LINE_SIZE = 4096
MAX_FIELD_SIZE = 8190


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pixel-server", description="Asynchronous high-throughput tracking-pixel server."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="answer pixels and flush their counts to PostgreSQL",
        description="Answer pixels and flush their counts to PostgreSQL. Every flag can also"
        " be set by its PIXEL_* environment variable.",
    )
    settings.add_arguments(serve_parser)
    args = parser.parse_args(argv)
    try:
        config = settings.from_namespace(args)
    except ValueError as error:
        parser.error(str(error))
    logs.configure(config.log_level)
    return serve(config)


def serve(config: Config) -> int:
    """Runs the server until SIGTERM or SIGINT; returns the exit status."""
    embedded = None
    dsn = config.dsn
    if not dsn:
        embedded = EmbeddedPostgres(config.data_dir)
        try:
            embedded.start()
        except RuntimeError as error:
            log.error("cannot start the embedded PostgreSQL in %s: %s", embedded.pgdata, error)
            return 1
        dsn = embedded.dsn
        print(
            f"embedded PostgreSQL running, data in {embedded.pgdata}\n"
            f"  DSN: {dsn}\n"
            f"  read the counts: {embedded.psql} '{dsn}' -c 'SELECT * FROM pixel_hourly'",
            flush=True,
        )
    else:
        log.info("flushing to %s", redact(dsn))
    try:
        return uvloop.run(_serve(config, dsn))
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded PostgreSQL stopped")


async def _serve(config: Config, dsn: str) -> int:
    app = make_app(config, dsn)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=config.shutdown_timeout,
        access_log=logging.getLogger("aiohttp.access") if config.access_log else None,
        keepalive_timeout=config.keepalive_timeout,
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
    )
    admin_runner = web.AppRunner(make_admin_app(app), handle_signals=False, access_log=None)
    await runner.setup()
    await admin_runner.setup()
    try:
        try:
            await web.TCPSite(runner, config.host, config.port, backlog=4096).start()
            await web.TCPSite(admin_runner, config.admin_host, config.admin_port).start()
        except OSError as error:
            log.error("cannot listen: %s", error)
            return 1
        log.info(
            "serving pixels on http://%s:%d, admin on http://%s:%d",
            config.host,
            config.port,
            config.admin_host,
            config.admin_port,
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        log.info("stopping: answering requests in flight, then the final flush")
    finally:
        await admin_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
