"""The ``pixel-server`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import uvloop
from aiohttp import web

from server import clicks, logs, protocol, report_command, signals, snippet, supervisor
from server import config as settings
from server.app import make_admin_app, make_app, snapshot_of
from server.app_keys import METRICS
from server.config import Config
from server.dsn import redact
from server.embedded import EmbeddedPostgres
from server.query import Dimensions, Rejected, check_value

log = logging.getLogger("server")

# Signed click links stay valid this long unless --expires-in says otherwise.
DEFAULT_LINK_LIFETIME = 90 * 24 * 3600


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
    serve_parser.set_defaults(run=_serve_command)
    sign_parser = commands.add_parser(
        "sign-click",
        help="print a signed click link",
        description="Print a click link that /c redirects to --to until it expires.",
    )
    add_click_arguments(sign_parser, required_to=True)
    sign_parser.set_defaults(run=_sign_click_command)
    snippet_parser = commands.add_parser(
        "snippet",
        help="print the HTML to paste into a creative",
        description="Print the pixel, the viewability script tag and, with --to, a signed click"
        " link: the HTML to paste into a creative's container.",
    )
    add_click_arguments(snippet_parser, required_to=False)
    snippet.add_arguments(snippet_parser)
    snippet_parser.set_defaults(run=_snippet_command)
    report_parser = commands.add_parser(
        "report",
        help="print impressions, viewability and clicks from the stored counts",
        description="Print impressions, GIVT impressions, measurable, viewable, viewability"
        " rate, clicks and CTR over a time range, grouped by campaign, creative, affiliate,"
        " sub-id, hour or day. --dsn and --data-dir work as for serve.",
    )
    report_command.add_arguments(report_parser)
    report_parser.set_defaults(run=report_command.command)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int] = args.run
    return run(args, parser)


def _serve_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = settings.from_namespace(args)
    except ValueError as error:
        parser.error(str(error))
    logs.configure(config.log_level)
    return serve(config)


def _base_url(text: str) -> str:
    """The pixel server's public address: http or https, a host, no query or fragment (the
    links and the snippet add their own paths and queries to it)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(
            f"not an http(s) address such as https://px.example: {text!r}"
        )
    return text


def add_click_arguments(parser: argparse.ArgumentParser, *, required_to: bool) -> None:
    """The flags of a signed click link: dimensions, destination, expiry, secret."""
    for flag, meaning in (
        ("--cid", "campaign id"),
        ("--crid", "creative id"),
        ("--aff", "affiliate id"),
        ("--sub", "sub-id / placement"),
    ):
        parser.add_argument(flag, default="", help=meaning)
    parser.add_argument(
        "--base-url",
        required=True,
        type=_base_url,
        help="public address of the pixel server, https://...",
    )
    parser.add_argument("--to", required=required_to, help="destination URL (http or https)")
    parser.add_argument(
        "--expires-in",
        type=int,
        default=DEFAULT_LINK_LIFETIME,
        metavar="SECONDS",
        help=f"how long the link stays valid (default {DEFAULT_LINK_LIFETIME} s, 90 days)",
    )
    parser.add_argument(
        "--secret",
        default=None,
        help="click-signing secret (default: the first of PIXEL_SECRET); prefer the variable,"
        " so the secret stays out of the shell history",
    )


def signed_click_url(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The signed link the click flags describe; exits with a usage error if they are invalid."""
    try:
        secrets = settings.parse_secret(args.secret or os.environ.get("PIXEL_SECRET", ""))
    except ValueError as error:
        parser.error(f"--secret / PIXEL_SECRET: {error}")
    try:
        dimensions = Dimensions(
            *(check_value(v) for v in (args.cid, args.crid, args.aff, args.sub))
        )
        clicks.check_destination(check_value(args.to, clicks.MAX_DESTINATION_BYTES))
    except Rejected as rejected:
        parser.error(f"invalid value: {rejected.reason}")
    if not secrets:
        parser.error("a secret is needed: --secret or PIXEL_SECRET")
    if args.expires_in < 1:
        parser.error("--expires-in must be at least 1 second")
    expires = int(time.time()) + args.expires_in
    try:
        return clicks.click_url(args.base_url, secrets[0], dimensions, args.to, expires)
    except ValueError as error:
        parser.error(str(error))


def _sign_click_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(signed_click_url(args, parser))
    return 0


def _snippet_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    click_url = signed_click_url(args, parser) if args.to else None
    try:
        print(snippet.from_arguments(args, click_url))
    except Rejected as rejected:
        parser.error(f"invalid value: {rejected.reason}")
    return 0


def serve(config: Config) -> int:
    """Runs the server until SIGTERM or SIGINT; returns the exit status."""
    if not config.secret:
        log.warning("no --secret / PIXEL_SECRET: click links cannot be verified; /c answers 400")
    with signals.noted() as received:
        return _serve_noting(config, received)


def _serve_noting(config: Config, received: list[int]) -> int:
    """:func:`serve`, with SIGTERM and SIGINT noted in ``received`` until the event loop
    heeds them."""
    embedded = None
    dsn = config.dsn
    if not dsn:
        embedded = EmbeddedPostgres(config.data_dir)
        try:
            embedded.start()
        except RuntimeError as error:
            log.error("cannot start the embedded PostgreSQL in %s: %s", embedded.pgdata, error)
            return 1
        if received:
            log.info("stopping: signalled while the embedded PostgreSQL started")
            if embedded.stop():
                log.info("embedded PostgreSQL stopped")
            return 0
        dsn = embedded.dsn
        if not embedded.started:
            log.warning(
                "the embedded PostgreSQL in %s was running already, another server's, which"
                " is running too; it is used as it is and left running at exit",
                embedded.pgdata,
            )
        print(
            f"embedded PostgreSQL running, data in {embedded.pgdata}\n"
            f"  DSN: {dsn}\n"
            f"  read the counts: {embedded.psql} '{dsn}' -c 'SELECT * FROM pixel_hourly'",
            flush=True,
        )
    else:
        log.info("flushing to %s", redact(dsn))
    try:
        if config.workers > 1:
            return uvloop.run(supervisor.Supervisor(config, dsn).run(received))
        return uvloop.run(_serve(config, dsn, received))
    finally:
        if embedded is not None and embedded.stop():
            log.info("embedded PostgreSQL stopped")


async def _serve(config: Config, dsn: str, received: list[int]) -> int:
    app = make_app(config, dsn)
    handler_args: dict[str, Any] = {
        "access_log": logging.getLogger("aiohttp.access") if config.access_log else None,
        "keepalive_timeout": config.keepalive_timeout,
        "max_line_size": protocol.MAX_LINE_SIZE,
        "max_field_size": protocol.MAX_FIELD_SIZE,
        # No public endpoint reads a body. aiohttp would read and discard an unread one for up
        # to 10 s before the next request; 0 closes the connection instead, so a POST with a
        # large body never costs more than a GET (server/viewability.py).
        "lingering_time": 0,
    }
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.shutdown_timeout, **handler_args
    )
    admin = make_admin_app(config, dsn, snapshot_of(app))
    # A worker of --workers: the port is shared, and the admin app is for the supervisor only.
    worker_socket = os.environ.get(supervisor.WORKER_SOCKET)
    if worker_socket:
        supervisor.stop_with_supervisor()
        supervisor.snapshot_route(admin, app[METRICS].snapshot)
    admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None)
    await runner.setup()
    await admin_runner.setup()
    pixels = None
    try:
        try:
            pixels = await protocol.listen(
                runner, config.host, config.port, reuse_port=bool(worker_socket), **handler_args
            )
            if worker_socket:
                await web.UnixSite(admin_runner, worker_socket).start()
            else:
                await web.TCPSite(admin_runner, config.admin_host, config.admin_port).start()
        except OSError as error:
            log.error("cannot listen: %s", error)
            return 1
        if not worker_socket:
            # The ports bound, which port 0 leaves to the system.
            log.info(
                "serving pixels on http://%s:%d, admin on http://%s:%d",
                config.host,
                pixels.sockets[0].getsockname()[1],
                config.admin_host,
                admin_runner.addresses[0][1],
            )
        stopping = asyncio.Event()
        signals.stop_on_signals(stopping, received)
        await stopping.wait()
        log.info("stopping: answering requests in flight, then the final flush")
    finally:
        if pixels is not None:
            pixels.close()  # no new connections; runner.cleanup() answers the open ones
        await admin_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
