"""``pixel-server serve`` with no DSN: the README's command, on the embedded PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtests.processes import PIXEL_SERVER
from server.embedded import EmbeddedPostgres
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
    # Tuned for reads of a range of buckets through the BRIN indexes, and checkpoints spaced
    # for a table whose every page of the bucket changes at each flush (server/embedded.py).
    for setting, value in (
        ("random_page_cost", "2"),
        ("max_wal_size", "4GB"),
        ("checkpoint_timeout", "15min"),
    ):
        assert (await fetch(dsn[1], f"SHOW {setting}"))[0][0] == value
    assert again.terminate() == 0


async def test_a_second_server_on_the_same_data_folder_leaves_the_database_running(
    pixel_server: Callable[..., PixelServer], tmp_path: Path
) -> None:
    """The first server started the embedded PostgreSQL, so it stops it, and only it; the
    folder's name has a space, which the server's options must quote."""
    data_dir = tmp_path / "pixel data"
    flags = (f"--data-dir={data_dir}", f"--spool-dir={tmp_path / 'spool'}")
    first = pixel_server(*flags, env={"PIXEL_DSN": ""})
    second = pixel_server(*flags, env={"PIXEL_DSN": ""})
    assert "was running already" in second.log()
    assert second.terminate() == 0, second.log()
    assert "embedded PostgreSQL stopped" not in second.log()
    with urllib.request.urlopen(f"{first.base_url}/readyz", timeout=5) as answer:
        assert answer.status == 200
    assert (data_dir / "postgres" / "postmaster.pid").exists()
    assert first.terminate() == 0, first.log()
    assert "embedded PostgreSQL stopped" in first.log()
    assert not (data_dir / "postgres" / "postmaster.pid").exists(), "PostgreSQL left running"


def running_initdb(pid: int) -> bool:
    """Whether process ``pid`` has a child running initdb (Linux's /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return any(Path(f"/proc/{child}/comm").read_text() == "initdb\n" for child in children)
    except OSError:  # a child gone meanwhile
        return False


@pytest.mark.parametrize("ctrl_c", [False, True])
def test_a_signal_while_the_embedded_database_starts_stops_it(tmp_path: Path, ctrl_c: bool) -> None:
    """A first start makes the cluster (initdb) and starts it, which takes seconds: SIGTERM
    meanwhile, or Ctrl-C (SIGINT to the terminal's whole process group), lets the start
    finish, then stops the database and exits 0, rather than killing the server (or initdb)
    and leaving PostgreSQL running, or half made, with no one to stop it."""
    data_dir = tmp_path / "pixel-data"
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [PIXEL_SERVER, "serve", f"--data-dir={data_dir}", "--port=0", "--admin-port=0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PIXEL_DSN": ""},
            start_new_session=True,  # a process group of its own, as at a terminal
        )
        try:
            deadline = time.monotonic() + 30
            while not running_initdb(server.pid):
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.005)
            if ctrl_c:
                os.killpg(server.pid, signal.SIGINT)
            else:
                server.send_signal(signal.SIGTERM)
            assert server.wait(60) == 0, (tmp_path / "server.log").read_text()
        finally:
            server.kill()
    text = (tmp_path / "server.log").read_text()
    assert "signalled while the embedded PostgreSQL started" in text, text
    assert "embedded PostgreSQL stopped" in text
    assert not (data_dir / "postgres" / "postmaster.pid").exists(), "PostgreSQL left running"


def test_a_long_data_folder_gets_a_socket_folder_for_as_long_as_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket's path has at most 107 bytes: a deeper data folder's server listens in a
    temporary folder, which goes when it stops; a second user of the running server takes
    the same folder and makes none."""
    postgres = EmbeddedPostgres(tmp_path / ("d" * 100))
    postgres.start()
    try:
        socket_dir = postgres.socket_dir
        assert socket_dir.name.startswith("pixel-pg-") and socket_dir.exists()
        user = EmbeddedPostgres(tmp_path / ("d" * 100))
        with monkeypatch.context() as patch:
            patch.setattr(tempfile, "mkdtemp", lambda **_: pytest.fail("a second socket folder"))
            user.start()
        assert user.socket_dir == socket_dir and not user.started
        user.stop()
        assert postgres.running() and socket_dir.exists()
    finally:
        postgres.stop()
    assert not postgres.running() and not socket_dir.exists()


def test_a_database_whose_server_was_killed_is_taken_over(tmp_path: Path) -> None:
    """The server that started the embedded PostgreSQL died without stopping it (SIGKILL):
    the next one to use it owns it, and stops it; not so while its starter lives, or when no
    owner is named."""
    first = EmbeddedPostgres(tmp_path / "data")
    first.start()
    try:
        second = EmbeddedPostgres(tmp_path / "data")
        second.start()
        assert not second.started  # the first, this very process, is alive
        (tmp_path / "data" / "postgres.owner").unlink()
        unnamed = EmbeddedPostgres(tmp_path / "data")
        unnamed.start()
        assert not unnamed.started  # started by hand, or by a release that named no owner
        killed = subprocess.Popen(["true"])
        killed.wait()
        (tmp_path / "data" / "postgres.owner").write_text(str(killed.pid))
        third = EmbeddedPostgres(tmp_path / "data")
        third.start()
        assert third.started
        third.stop()
        assert not first.running()
    finally:
        first.stop()


# A server whose ``module.factory`` (argv[1], argv[2]) sends it SIGTERM first, as if the signal
# came between the embedded PostgreSQL's start and the event loop's own signal handlers.
_SIGNALLED_WHILE_STARTING = """
import importlib, os, signal, sys
from server import cli
module = importlib.import_module(sys.argv[1])
factory = getattr(module, sys.argv[2])
def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return factory(*args, **kwargs)
setattr(module, sys.argv[2], signalled)
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    ("factory", "workers"),
    [
        ("server.cli.make_app", 1),
        ("server.supervisor.make_admin_app", 2),
        ("server.supervisor.worker_environment", 2),
    ],
)
def test_a_signal_after_the_embedded_database_started_stops_it(
    tmp_path: Path, factory: str, workers: int
) -> None:
    """SIGTERM while the apps are being made, before the event loop heeds signals: the
    server stops as if it came a moment later (exit 0, the database stopped), rather than
    being killed and leaving PostgreSQL running. With workers, SIGTERM as the first one is
    started: passed on to it while it is still starting, it kills it, which had counted
    nothing, and the supervisor stops cleanly all the same."""
    data_dir = tmp_path / "pixel-data"
    module, _, name = factory.rpartition(".")
    server = subprocess.run(
        [
            *(sys.executable, "-c", _SIGNALLED_WHILE_STARTING, module, name),
            *("serve", f"--data-dir={data_dir}", f"--workers={workers}"),
            *("--port=0", "--admin-port=0", f"--spool-dir={tmp_path / 'spool'}"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PIXEL_DSN": ""},
        timeout=120,
    )
    try:
        assert server.returncode == 0, server.stderr
        assert "embedded PostgreSQL stopped" in server.stderr
        assert not (data_dir / "postgres" / "postmaster.pid").exists(), "PostgreSQL left running"
    finally:
        if (data_dir / "postgres" / "postmaster.pid").exists():
            left = EmbeddedPostgres(data_dir)  # takes over the database left running
            left.start()
            left.stop()
