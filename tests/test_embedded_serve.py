"""``pixel-server serve`` with no DSN: the README's command, on the embedded PostgreSQL."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.harness import PixelServer, fetch


async def test_serve_without_dsn_runs_on_embedded_postgres_and_stops_it(
    pixel_server: Callable[..., PixelServer], tmp_path: Path
) -> None:
    data_dir = tmp_path / "pixel-data"
    server = pixel_server(f"--data-dir={data_dir}", "--flush-interval=0.1", env={"PIXEL_DSN": ""})
    pixel = urllib.request.Request(
        f"{server.base_url}/i.gif?cid=embedded", headers={"User-Agent": "Mozilla/5.0 (X11)"}
    )
    with urllib.request.urlopen(pixel, timeout=5) as answer:
        assert answer.read(100) and answer.status == 200
    log = server.log()
    dsn = re.search(r"DSN: (\S+)", log)
    assert dsn is not None, log
    assert re.search(r"read the counts: \S*psql '" + re.escape(dsn[1]) + "'", log)
    assert server.terminate() == 0, server.log()
    assert not (data_dir / "postgres" / "postmaster.pid").exists(), "PostgreSQL left running"

    # The counts are on disk: the next start finds them.
    again = pixel_server(f"--data-dir={data_dir}", env={"PIXEL_DSN": ""})
    rows = await fetch(dsn[1], "SELECT campaign, impressions FROM pixel_counts")
    assert [tuple(row) for row in rows] == [("embedded", 1)]
    assert again.terminate() == 0
