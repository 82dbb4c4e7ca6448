"""Fixtures: a real PostgreSQL (embedded, or ``PIXEL_TEST_DSN``) with a fresh database per test,
and real ``pixel-server`` processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from server.embedded import EmbeddedPostgres
from tests.harness import PixelServer, with_database


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server: ``PIXEL_TEST_DSN`` (a URL) if set, else an embedded one."""
    dsn = os.environ.get("PIXEL_TEST_DSN")
    if dsn:
        yield dsn
        return
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("embedded"))
    embedded.start()
    try:
        yield embedded.dsn
    finally:
        embedded.stop()


@pytest.fixture
async def database(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database on the test server; returns its DSN."""
    name = "pixel_test_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(postgres_dsn, name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL cluster of the test's own, to stop and start at will."""
    postgres = EmbeddedPostgres(tmp_path / "own-postgres")
    postgres.start()
    try:
        yield postgres
    finally:
        postgres.stop()


@pytest.fixture
def pixel_server(tmp_path: Path) -> Iterator[Callable[..., PixelServer]]:
    """Starts ``pixel-server serve`` processes; any still running at the end is killed."""
    started: list[PixelServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> PixelServer:
        # A data folder (so a spool) of each server's own, unless the test's flags name one (the
        # last flag wins): a batch one test leaves spooled must never reach another's database.
        own_data = f"--data-dir={tmp_path / f'data-{len(started)}'}"
        server = PixelServer(tmp_path / f"server-{len(started)}.log", own_data, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses a database is marked ``db``, so ``-m db`` selects them all."""
    for item in items:
        if "postgres_dsn" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)
