"""Reconciles a load run's tallies with ``pixel_counts``.

    python -m loadtests.verify --tally-dir tallies --dsn postgresql://...

It adds up the tally files the load processes wrote (per key and event: what the server
answered), reads the same keys' totals from PostgreSQL after the server's final flush, and
prints sent / stored / missing / extra per event type. Malformed requests must be answered and
never stored. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from pathlib import Path

import asyncpg
import orjson

from loadtests.accounting import Key, Reconciliation, reconcile

# Event of the tally -> column of pixel_counts.
COLUMNS = {
    "impression": "impressions",
    "measurable": "measurable",
    "viewable": "viewable",
    "click": "clicks",
}


def read_tallies(folder: Path) -> dict[str, collections.Counter[Key]]:
    sent: dict[str, collections.Counter[Key]] = collections.defaultdict(collections.Counter)
    for path in sorted(folder.glob("tally-*.json")):
        for campaign, creative, affiliate, sub_id, event, count in orjson.loads(path.read_bytes()):
            sent[event][(campaign, creative, affiliate, sub_id)] += count
    return sent


async def stored_counts(dsn: str, campaigns: set[str]) -> dict[str, dict[Key, int]]:
    """The stored totals of the run's campaigns, per event, per key; plus everything stored
    for any other key of those campaigns (a malformed request must add none)."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT campaign, creative, affiliate, sub_id, sum(impressions)::bigint,"
            " sum(measurable)::bigint, sum(viewable)::bigint, sum(clicks)::bigint"
            " FROM pixel_counts WHERE campaign = ANY($1::text[]) GROUP BY 1, 2, 3, 4",
            sorted(campaigns),
        )
    finally:
        await connection.close()
    stored: dict[str, dict[Key, int]] = {event: {} for event in COLUMNS}
    for row in rows:
        key = (row[0], row[1], row[2], row[3])
        for event, value in zip(COLUMNS, row[4:], strict=True):
            if value:
                stored[event][key] = value
    return stored


async def verify(folder: Path, dsn: str) -> tuple[dict[str, Reconciliation], int]:
    """Per event, the reconciliation; and how many malformed requests were answered."""
    sent = read_tallies(folder)
    campaigns = {key[0] for counter in sent.values() for key in counter}
    stored = await stored_counts(dsn, campaigns)
    results = {event: reconcile(sent[event], stored[event]) for event in COLUMNS}
    return results, sum(sent["rejected"].values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tally-dir", type=Path, required=True)
    parser.add_argument("--dsn", required=True, help="the database the server flushed to")
    args = parser.parse_args()
    if not list(args.tally_dir.glob("tally-*.json")):
        parser.error(f"no tally files in {args.tally_dir}: did the load run use --tally-dir?")
    try:
        results, rejected = asyncio.run(verify(args.tally_dir, args.dsn))
    except (OSError, asyncpg.PostgresError) as error:
        print(f"cannot read pixel_counts: {error}", file=sys.stderr)
        return 2
    print(f"{'event':<12}{'sent':>10}{'stored':>10}{'missing':>10}{'extra':>10}")
    for event, result in results.items():
        row = (result.sent, result.stored, result.missing, result.extra)
        print(f"{event:<12}" + "".join(f"{value:>10}" for value in row))
    print(f"malformed requests answered and not stored: {rejected}")
    exact = all(result.exact for result in results.values())
    print("exact match" if exact else "MISMATCH")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
