"""Fixtures for the store suite: ``db_url`` and ``store``, each on SQLite and on PostgreSQL.

The PostgreSQL fixtures come from :mod:`tests.pgserver` (a private server per
session); the ``postgres`` parameter carries ``@pytest.mark.postgres`` so
``-m "not postgres"`` runs the SQLite half alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tapproof.store import SQLStore, open_store
from tests.pgserver import PgServer, pg_server, pg_url

__all__ = ["db_url", "pg_server", "pg_url", "store"]

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty database (no schema yet) on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tapproof.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)


@pytest.fixture
def store(db_url: str) -> Iterator[SQLStore]:
    """A migrated, empty store on each backend, closed after the test."""
    s = open_store(db_url, migrate=True)
    try:
        yield s
    finally:
        s.close()
