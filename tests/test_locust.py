"""The load testers' tool: a bounded headless Locust run, then the exact reconciliation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from loadtests import verify
from tests.harness import PixelServer, fetch

ROOT = Path(__file__).resolve().parent.parent
SECRET = "locust-secret-0123456789"


async def test_locust_run_is_stored_exactly_and_verify_catches_a_lost_row(
    pixel_server: Callable[..., PixelServer], database: str, tmp_path: Path
) -> None:
    server = pixel_server(f"--dsn={database}", "--flush-interval=0.5", f"--secret={SECRET}")
    tallies = tmp_path / "tallies"
    locust = Path(sys.executable).parent / "locust"
    # Bounded: 12 s of load from two processes, settings from [tool.locust] in pyproject.toml.
    run = await asyncio.to_thread(
        subprocess.run,
        [
            str(locust),
            "--headless",
            "--only-summary",
            "--processes=2",
            "--users=60",
            "--spawn-rate=30",
            "--run-time=12s",
            "--stop-timeout=10",
            f"--host={server.base_url}",
            f"--tally-dir={tallies}",
            "--malformed-share=0.05",
            "--ctr=0.03",
        ],
        cwd=ROOT,
        env={**os.environ, "PIXEL_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]  # the quitting gate: no failure at all
    assert await asyncio.to_thread(server.terminate) == 0, server.log()

    results, rejected = await verify.verify(tallies, database)
    assert all(result.exact for result in results.values()), results
    assert results["impression"].sent > 500
    assert results["measurable"].sent > 0 and results["viewable"].sent > 0
    assert results["click"].sent > 0
    assert rejected > 0

    # Losing one stored row must not go unnoticed.
    await fetch(
        database,
        "DELETE FROM pixel_counts WHERE ctid = (SELECT ctid FROM pixel_counts"
        " WHERE impressions > 0 LIMIT 1)",
    )
    broken, _ = await verify.verify(tallies, database)
    assert broken["impression"].missing > 0
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "loadtests.verify", f"--tally-dir={tallies}", f"--dsn={database}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1 and "MISMATCH" in cli.stdout, cli.stdout
