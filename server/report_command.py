"""``pixel-server report``: the operator's everyday questions, answered from ``pixel_counts``.

It reads the database ``serve`` flushes to: ``--dsn`` / ``PIXEL_DSN``, or else the embedded
PostgreSQL in ``--data-dir``, started for the report if it is not running and stopped after.
It never writes. Exit status: 0 with the report (an empty range included: a message on stderr,
an empty table, ``[]`` or a CSV header), 1 when the database cannot answer, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TextIO

import asyncpg
import orjson

from server import config as settings
from server import embedded
from server.dsn import redact
from server.logs import describe
from server.report import DIMENSIONS, MEASURES, RATES, TIMES, Query, Value, as_dicts, fetch, iso_utc

CONNECT_TIMEOUT = 10.0
DEFAULT_SINCE = "24h"
FILTERS = ("campaign", "creative", "affiliate", "sub_id")

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATABASE_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

Rows = Sequence[tuple[Value, ...]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, ("dsn", "data_dir"))
    parser.add_argument(
        "--by",
        action="append",
        choices=DIMENSIONS,
        help="group by this (repeat it to group by several, e.g. --by campaign --by hour);"
        " default campaign",
    )
    parser.add_argument(
        "--since",
        metavar="DURATION",
        help=f"the last DURATION: 90m, 24h, 7d, 2w (default {DEFAULT_SINCE}; before --to if given);"
        " by hour or day, from the start of the hour or day it begins in",
    )
    parser.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        help="start of the range, ISO 8601 (2024-05-01 or 2024-05-01T13:00; UTC unless it says)",
    )
    parser.add_argument("--to", dest="end", metavar="TIME", help="end of the range (default now)")
    for dimension in FILTERS:
        parser.add_argument(
            "--" + dimension.replace("_", "-"),
            metavar="VALUE",
            help=f"only where {dimension} is VALUE",
        )
    columns = [*DIMENSIONS, *MEASURES]
    parser.add_argument(
        "--sort",
        choices=columns,
        metavar="COLUMN",
        help=f"sort by this column: {', '.join(columns)} (default: hour or day, then impressions)",
    )
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--asc", dest="descending", action="store_false", default=None, help="sort ascending"
    )
    order.add_argument(
        "--desc",
        dest="descending",
        action="store_true",
        default=None,
        help="sort descending (the default for measures)",
    )
    parser.add_argument("--top", type=int, metavar="N", help="only the first N rows")
    parser.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="default table"
    )


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        query = query_from(args, datetime.now(UTC))
        config = settings.from_namespace(args, names=("dsn", "data_dir"))
    except ValueError as error:
        parser.error(str(error))
    try:
        if config.dsn:
            return asyncio.run(print_report(config.dsn, query, args.format))
        return _on_embedded(config.data_dir, query, args.format)
    except BrokenPipeError:
        # The reader left early (| head): what it read is the report it wanted. Python would
        # complain again flushing stdout at exit, so that goes nowhere now.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130  # Ctrl-C: the shell's status for SIGINT, without a traceback


def query_from(args: argparse.Namespace, now: datetime) -> Query:
    """The query the flags ask for; ``ValueError`` names what is wrong."""
    if args.start is not None and args.since is not None:
        raise ValueError("give --since or --from, not both")
    if args.descending is not None and args.sort is None:
        raise ValueError("--asc and --desc turn the order of --sort: give --sort too")
    end = parse_time(args.end, "--to") if args.end is not None else now
    if args.start is not None:
        start = parse_time(args.start, "--from")
    else:
        since = parse_duration(args.since or DEFAULT_SINCE)
        try:
            start = _whole(end - since, args.by or ())
        except OverflowError:
            raise ValueError(
                f"--since: {args.since} before {end.date().isoformat()} is before year 1"
            ) from None
    day = timedelta(days=1)
    if args.end is not None and _is_date(args.end) and end <= start < end + day:
        # --from D --to D: the range ends where D begins.
        raise ValueError(
            f"the range is empty: --to is where it ends, not included; --to"
            f" {(end + day).date().isoformat()} takes in {end.date().isoformat()}"
        )
    return Query(
        start=start,
        end=end,
        by=tuple(args.by or ("campaign",)),
        sort=args.sort,
        descending=args.descending,
        top=args.top,
        filters=tuple(
            (dimension, getattr(args, dimension))
            for dimension in FILTERS
            if getattr(args, dimension) is not None
        ),
    )


def parse_duration(text: str) -> timedelta:
    """``90m``, ``24h``, ``7d``, ``2w``, ``30s``.

    >>> parse_duration("36h")
    datetime.timedelta(days=1, seconds=43200)
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(f"--since: not a duration such as 90m, 24h or 7d: {text!r}")
    try:
        return timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    except OverflowError:
        raise ValueError(f"--since: {text!r} is longer than any time span") from None


def _whole(start: datetime, by: Sequence[str]) -> datetime:
    """The start of a ``--since`` range, moved back to the start of its day (UTC) or hour when
    the report is by day or hour, so that its first row counts a whole one."""
    start = start.astimezone(UTC)
    if "day" in by:
        return start.replace(hour=0, minute=0, second=0, microsecond=0)
    if "hour" in by:
        return start.replace(minute=0, second=0, microsecond=0)
    return start


def _is_date(text: str) -> bool:
    """Whether ``text`` is a date alone (2024-05-01), no time of day."""
    try:
        date.fromisoformat(text.strip())
    except ValueError:
        return False
    return True


def parse_time(text: str, flag: str) -> datetime:
    """An ISO 8601 date or time; one without an offset is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{flag}: not an ISO 8601 time such as 2024-05-01T13:00: {text!r}"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _on_embedded(data_dir: Path, query: Query, output: str) -> int:
    if not embedded.cluster_exists(data_dir):
        _say(
            f"no embedded database in {data_dir / embedded.CLUSTER}: pixel-server serve keeps"
            " its counts there (or give --dsn / PIXEL_DSN)"
        )
        return 1
    postgres = embedded.EmbeddedPostgres(data_dir)
    try:
        postgres.start()
    except RuntimeError as error:
        _say(f"cannot start the embedded PostgreSQL in {postgres.pgdata}: {error}")
        return 1
    try:
        return asyncio.run(print_report(postgres.dsn, query, output))
    finally:
        postgres.stop()  # if the report started it


async def print_report(
    dsn: str, query: Query, output: str, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Runs the query and prints its rows to ``out`` as ``output`` (table, csv or json);
    messages go to ``err``. Returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        connection = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    except _DATABASE_ERRORS as error:
        _say(f"cannot connect to the database {redact(dsn)}: {describe(error)}", err)
        return 1
    try:
        rows = await fetch(connection, query)
    except asyncpg.UndefinedTableError:
        _say(f"no pixel_counts table in {redact(dsn)}: pixel-server serve creates it", err)
        return 1
    except _DATABASE_ERRORS as error:
        _say(f"the report failed on {redact(dsn)}: {describe(error)}", err)
        return 1
    finally:
        await connection.close()
    if not rows:
        where = "".join(f", {dimension} = {value!r}" for dimension, value in query.filters)
        _say(f"no counts between {iso_utc(query.start)} and {iso_utc(query.end)}{where}", err)
    FORMATS[output](query.columns, rows, out)
    return 0


def write_table(columns: Sequence[str], rows: Rows, out: TextIO) -> None:
    """Aligned columns with a rule under the header: numbers right-aligned with thousands
    separators, rates as percentages, ``-`` for a rate of nothing, ``(none)`` for ''."""
    if not rows:
        return
    lines = [list(columns)]
    lines += [[_cell(c, v) for c, v in zip(columns, row, strict=True)] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    lines.insert(1, ["-" * width for width in widths])
    for line in lines:
        cells = (
            text.rjust(width) if column in MEASURES else text.ljust(width)
            for column, text, width in zip(columns, line, widths, strict=True)
        )
        out.write("  ".join(cells).rstrip() + "\n")


# What a spreadsheet takes a cell starting with for a formula. Dimension values come from the
# public pixel port: ``/i.gif?cid=%3DHYPERLINK(...)`` would otherwise run in the operator's
# spreadsheet when the file is opened.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def write_csv(columns: Sequence[str], rows: Rows, out: TextIO) -> None:
    """A header and one line per row; rates as fractions, empty where there is none. A text
    value a spreadsheet would take for a formula gets a leading ``'``."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_spreadsheet_safe(value) for value in row] for row in rows)


def _spreadsheet_safe(value: Value) -> Value:
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def write_json(columns: Sequence[str], rows: Rows, out: TextIO) -> None:
    """An array of objects, one per row; rates as fractions or null."""
    out.write(orjson.dumps(as_dicts(columns, rows), option=orjson.OPT_INDENT_2).decode() + "\n")


FORMATS: dict[str, Callable[[Sequence[str], Rows, TextIO], None]] = {
    "table": write_table,
    "csv": write_csv,
    "json": write_json,
}


def _cell(column: str, value: Value) -> str:
    if column in RATES:
        return "-" if value is None else f"{value:.2%}"
    if isinstance(value, int):
        return f"{value:,}"
    if value == "" and column not in TIMES:
        return "(none)"
    return str(value)


def _say(message: str, err: TextIO | None = None) -> None:
    print(f"pixel-server report: {message}", file=err or sys.stderr)
