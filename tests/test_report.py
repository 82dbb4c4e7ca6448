"""``pixel-server report``: exact figures from known rows in every output format, sorting, top N,
time ranges and filters, the empty range, and the database it cannot reach or has to start."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from loadtests.processes import PIXEL_SERVER
from server import report_command, storage
from server.embedded import EmbeddedPostgres
from tests.harness import free_port, insert_counts

# (bucket, campaign, creative, affiliate, sub_id, impressions, givt_impressions, measurable,
# viewable, clicks, givt_clicks)
ROWS = [
    ("2024-04-30T23:59", "autumn", "x", "y", "z", 99, 0, 0, 0, 9, 0),  # the day before
    ("2024-05-01T10:00", "spring", "banner-1", "partner-7", "top", 1000, 10, 800, 600, 20, 1),
    ("2024-05-01T10:01", "spring", "banner-1", "partner-7", "top", 500, 5, 400, 200, 10, 0),
    ("2024-05-01T10:30", "spring", "banner-2", "partner-8", "", 300, 0, 300, 300, 3, 0),
    ("2024-05-01T11:15", "summer", "banner-1", "partner-7", "top", 2000, 40, 0, 0, 100, 2),
    ("2024-05-01T12:05", "", "", "", "", 7, 7, 0, 0, 0, 0),
    ("2024-05-02T09:00", "spring", "banner-1", "partner-7", "top", 50, 0, 40, 20, 1, 0),
]
MAY_1 = ("--from=2024-05-01", "--to=2024-05-02")
NOW = datetime(2024, 5, 3, tzinfo=UTC)


async def seed(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await storage.migrate(connection)
    finally:
        await connection.close()
    await insert_counts(
        dsn, [(datetime.fromisoformat(row[0]).replace(tzinfo=UTC), *row[1:]) for row in ROWS]
    )


@pytest.fixture
async def counts(database: str) -> str:
    """A database holding ROWS; returns its DSN."""
    await seed(database)
    return database


async def report(dsn: str, *flags: str) -> tuple[int, str, str]:
    """Runs the command's flags, query and output in this process: (status, stdout, stderr)."""
    parser = argparse.ArgumentParser()
    report_command.add_arguments(parser)
    args = parser.parse_args([f"--dsn={dsn}", *flags])
    out, err = io.StringIO(), io.StringIO()
    query = report_command.query_from(args, NOW)
    status = await report_command.print_report(args.dsn, query, args.format, out, err)
    return status, out.getvalue(), err.getvalue()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command; PIXEL_* variables only as given."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("PIXEL_")}
    return subprocess.run(
        [PIXEL_SERVER, "report", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **(env or {})},
    )


async def test_the_table_by_campaign_has_exact_sums_and_rates(counts: str) -> None:
    status, out, err = await report(counts, *MAY_1)
    assert (status, err) == (0, "")
    # The whole table, to the character: alignment is what makes it readable.
    assert out.splitlines() == [
        "campaign  impressions  givt_impressions  measurable  viewable  viewability_rate  clicks  givt_clicks    ctr",  # noqa: E501
        "--------  -----------  ----------------  ----------  --------  ----------------  ------  -----------  -----",  # noqa: E501
        "summer          2,000                40           0         0                 -     100            2  5.00%",  # noqa: E501
        "spring          1,800                15       1,500     1,100            73.33%      33            1  1.83%",  # noqa: E501
        "(none)              7                 7           0         0                 -       0            0  0.00%",  # noqa: E501
    ]


async def test_json_and_csv_carry_the_same_figures(counts: str) -> None:
    status, out, _ = await report(counts, *MAY_1, "--by=campaign", "--by=hour", "--format=json")
    assert status == 0
    rows = orjson.loads(out)
    assert rows[:2] == [
        {
            "campaign": "spring",
            "hour": "2024-05-01T10:00:00Z",
            "impressions": 1800,
            "givt_impressions": 15,
            "measurable": 1500,
            "viewable": 1100,
            "viewability_rate": 1100 / 1500,
            "clicks": 33,
            "givt_clicks": 1,
            "ctr": 33 / 1800,
        },
        {
            "campaign": "summer",
            "hour": "2024-05-01T11:00:00Z",
            "impressions": 2000,
            "givt_impressions": 40,
            "measurable": 0,
            "viewable": 0,
            "viewability_rate": None,
            "clicks": 100,
            "givt_clicks": 2,
            "ctr": 0.05,
        },
    ]
    assert [(row["campaign"], row["hour"]) for row in rows] == [
        ("spring", "2024-05-01T10:00:00Z"),
        ("summer", "2024-05-01T11:00:00Z"),
        ("", "2024-05-01T12:00:00Z"),
    ]
    status, out, _ = await report(counts, *MAY_1, "--by=campaign", "--by=hour", "--format=csv")
    assert status == 0
    lines = list(csv.reader(io.StringIO(out)))
    assert lines[0] == list(rows[0])
    spring = ["spring", "2024-05-01T10:00:00Z", "1800", "15", "1500", "1100", repr(1100 / 1500)]
    assert lines[1] == [*spring, "33", "1", repr(33 / 1800)]
    assert lines[2][6] == ""  # no rate where nothing was measurable
    assert len(lines) == 1 + len(rows)


async def test_any_column_sorts_and_top_keeps_the_first_rows(counts: str) -> None:
    async def campaigns(*flags: str) -> list[str]:
        status, out, _ = await report(counts, *MAY_1, "--format=json", *flags)
        assert status == 0
        return [row["campaign"] for row in orjson.loads(out)]

    assert await campaigns() == ["summer", "spring", ""]
    assert await campaigns("--sort=ctr") == ["summer", "spring", ""]
    assert await campaigns("--sort=ctr", "--asc") == ["", "spring", "summer"]
    # Rates of nothing come last either way.
    assert await campaigns("--sort=viewability_rate") == ["spring", "", "summer"]
    assert await campaigns("--sort=campaign") == ["", "spring", "summer"]
    assert await campaigns("--sort=campaign", "--desc") == ["summer", "spring", ""]
    assert await campaigns("--sort=givt_impressions", "--top=2") == ["summer", "spring"]
    assert await campaigns("--top=1") == ["summer"]


async def test_the_range_and_the_filters_choose_the_buckets(counts: str) -> None:
    async def impressions(*flags: str) -> list[tuple[str, int]]:
        status, out, _ = await report(counts, "--format=json", *flags)
        assert status == 0
        return [(row[next(iter(row))], row["impressions"]) for row in orjson.loads(out)]

    # [from, to): 10:01 is in, 11:15 is not.
    assert await impressions("--from=2024-05-01T10:01", "--to=2024-05-01T11:15") == [
        ("spring", 800)
    ]
    # --since counts back from --to (or from now).
    assert await impressions("--since=90m", "--to=2024-05-01T11:30") == [
        ("summer", 2000),
        ("spring", 1800),
    ]
    assert await impressions("--since=1d") == [("spring", 50)]  # NOW is 2024-05-03
    # By hour or day, the range starts where its first hour or day does: a whole first row
    # (10:00-11:00 holds 1,800, of which 300 after 10:30; 1 May 3,807, of which 2,307 after 10:30).
    assert await impressions("--since=1h", "--to=2024-05-01T11:30", "--by=hour") == [
        ("2024-05-01T10:00:00Z", 1800),
        ("2024-05-01T11:00:00Z", 2000),
    ]
    assert await impressions("--since=1d", "--to=2024-05-02T10:30", "--by=day") == [
        ("2024-05-01", 3807),
        ("2024-05-02", 50),
    ]
    # ... in UTC (from 00:00+02:00 it would take in 30 April's 23:59).
    assert await impressions("--since=1d", "--to=2024-05-02T12:30+02:00", "--by=day") == [
        ("2024-05-01", 3807),
        ("2024-05-02", 50),
    ]
    # An offset is honoured: 12:00+02:00 is 10:00 UTC.
    assert await impressions("--from=2024-05-01T12:00+02:00", "--to=2024-05-01T10:01Z") == [
        ("spring", 1000)
    ]
    assert await impressions(*MAY_1, "--campaign=spring", "--by=creative") == [
        ("banner-1", 1500),
        ("banner-2", 300),
    ]
    assert await impressions(*MAY_1, "--affiliate=partner-7", "--sub-id=top", "--by=campaign") == [
        ("summer", 2000),
        ("spring", 1500),
    ]
    assert await impressions("--from=2024-04-30", "--to=2024-05-03", "--by=day") == [
        ("2024-04-30", 99),
        ("2024-05-01", 3807),
        ("2024-05-02", 50),
    ]
    status, out, _ = await report(counts, *MAY_1, "--by=sub_id", "--by=affiliate")
    assert status == 0
    assert [re.split(r"\s{2,}", line) for line in out.splitlines()[2:]] == [
        ["top", "partner-7", "3,500", "55", "1,200", "800", "66.67%", "130", "3", "3.71%"],
        ["(none)", "partner-8", "300", "0", "300", "300", "100.00%", "3", "0", "1.00%"],
        ["(none)", "(none)", "7", "7", "0", "0", "-", "0", "0", "0.00%"],
    ]


async def test_csv_keeps_a_spreadsheet_from_running_a_dimension_as_a_formula(
    counts: str,
) -> None:
    """Dimension values come from the public pixel port: one a spreadsheet would take for a
    formula is written with a leading quote in CSV, and as it is in JSON."""
    formula = '=HYPERLINK("http://example.invalid","x")'
    bucket = datetime(2024, 5, 1, 13, tzinfo=UTC)
    await insert_counts(counts, [(bucket, formula, "", "-1", "", 5, 0, 0, 0, 0, 0)])
    flags = (*MAY_1, "--campaign", formula, "--by=campaign", "--by=affiliate")
    status, out, _ = await report(counts, *flags, "--format=csv")
    assert status == 0
    assert list(csv.reader(io.StringIO(out)))[1][:3] == ["'" + formula, "'-1", "5"]
    status, out, _ = await report(counts, *flags, "--format=json")
    assert [(row["campaign"], row["affiliate"]) for row in orjson.loads(out)] == [(formula, "-1")]


async def test_an_empty_range_says_so_and_prints_an_empty_report(counts: str) -> None:
    empty = ("--from=2023-01-01", "--to=2023-01-02")
    message = (
        "pixel-server report: no counts between 2023-01-01T00:00:00Z and 2023-01-02T00:00:00Z\n"
    )
    assert await report(counts, *empty) == (0, "", message)
    assert await report(counts, *empty, "--format=json") == (0, "[]\n", message)
    status, out, err = await report(counts, *empty, "--format=csv", "--by=hour")
    assert (status, err) == (0, message)
    assert out.splitlines() == [
        "hour,impressions,givt_impressions,measurable,viewable,viewability_rate,clicks,givt_clicks,ctr"
    ]
    status, _, err = await report(counts, *MAY_1, "--campaign=nothing")
    assert err.endswith("2024-05-02T00:00:00Z, campaign = 'nothing'\n")


async def test_a_database_without_the_table_is_named(database: str) -> None:
    status, out, err = await report(database, *MAY_1)
    assert (status, out) == (1, "")
    assert "no pixel_counts table in" in err
    assert "pixel-server serve creates it" in err


async def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    port = free_port()
    result = await asyncio.to_thread(
        run_cli, f"--dsn=postgresql://reporter:s3cret@127.0.0.1:{port}/pixels"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        "pixel-server report: cannot connect to the database"
        f" postgresql://reporter:***@127.0.0.1:{port}/pixels: "
    )
    assert result.stderr.count("\n") == 1
    assert "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--since=5x"], "--since: not a duration"),
        (["--since=1h", "--from=2024-05-01"], "give --since or --from, not both"),
        (["--from=yesterday"], "--from: not an ISO 8601 time"),
        (["--from=2024-05-02", "--to=2024-05-01"], "the range is empty"),
        (
            ["--from=2024-05-01", "--to=2024-05-01"],
            "--to is where it ends, not included; --to 2024-05-02 takes in 2024-05-01",
        ),
        (["--desc"], "--asc and --desc turn the order of --sort: give --sort too"),
        (["--sort=hour"], "cannot sort by hour"),
        (["--top=0"], "top must be at least 1"),
        (["--since=10000000d"], "is before year 1"),
        (["--since=1d", "--to=0001-01-01T12:00"], "1d before 0001-01-01 is before year 1"),
        (["--since=99999999999999w"], "is longer than any time span"),
    ],
)
def test_bad_flags_are_usage_errors(flags: list[str], message: str) -> None:
    result = run_cli("--dsn=postgresql://nowhere/none", *flags)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.db
def test_the_embedded_database_is_started_for_the_report_and_left_as_found(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    postgres = EmbeddedPostgres(data)
    postgres.start()
    try:
        asyncio.run(seed(postgres.dsn))
    finally:
        postgres.stop()
    # Not running: the report starts it, and stops it after.
    result = run_cli(f"--data-dir={data}", *MAY_1, "--format=csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("summer,2000,40,0,0,,100,2,0.05")
    assert not postgres.running()
    # Running (a server uses it): the report uses it and leaves it running.
    postgres.start()
    try:
        result = run_cli(*MAY_1, "--format=json", env={"PIXEL_DATA_DIR": str(data)})
        assert result.returncode == 0, result.stderr
        assert orjson.loads(result.stdout)[0]["campaign"] == "summer"
        assert postgres.running()
    finally:
        postgres.stop()


def test_no_embedded_database_is_a_clear_message(tmp_path: Path) -> None:
    result = run_cli(f"--data-dir={tmp_path / 'none'}")
    assert result.returncode == 1
    assert result.stderr == (
        f"pixel-server report: no embedded database in {tmp_path / 'none' / 'postgres'}:"
        " pixel-server serve keeps its counts there (or give --dsn / PIXEL_DSN)\n"
    )
    assert not (tmp_path / "none").exists()  # asking created nothing
