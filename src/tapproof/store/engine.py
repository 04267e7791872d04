"""Engines, transactions and error translation for the SQL store.

* :func:`make_engine` turns a ``sqlite:///PATH`` or ``postgresql://...`` URL
  into one thread-safe SQLAlchemy engine (``postgresql://`` runs on psycopg 3).
  SQLite gets WAL, ``busy_timeout`` and foreign keys on every connection, and
  pysqlite's own transaction handling is switched off so that we emit
  ``BEGIN`` ourselves: ``BEGIN IMMEDIATE`` for transactions that write, which
  take the write lock up front and so queue behind each other (for up to
  ``busy_timeout``) instead of failing with "database is locked" on upgrade.
* :func:`run_tx` runs one function in one transaction, retries PostgreSQL
  serialization failures and deadlocks, and translates driver errors into the
  :class:`~tapproof.errors.StoreError` tree with ``raise ... from exc``.
* Outages: a database that cannot be reached or read raises
  :class:`~tapproof.errors.StoreUnavailable` at once (PostgreSQL: refused or
  ``connect_timeout``; the API answers 503). The gauge ``tapproof_store_up``
  and one ``store-down``/``store-up`` log line per transition say so (a
  failure before the first success is the caller's error to report). Nothing
  needs a restart afterwards: PostgreSQL connections are pre-pinged at
  checkout, so the pool drops dead ones and reconnects by itself.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from prometheus_client import Counter, Gauge
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url

from tapproof.errors import ConfigError, Conflict, StoreError, StoreUnavailable
from tapproof.logs import log_event

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the write lock before giving up."""

PG_CONNECT_TIMEOUT_S = 5
"""libpq ``connect_timeout`` unless the URL sets one (a black-holed database fails a request, not hangs it)."""

PG_POOL_TIMEOUT_S = 10
"""How long a PostgreSQL transaction waits for a pooled connection before it fails (StoreUnavailable)."""

STORE_UP = Gauge("tapproof_store_up", "1 while database transactions work, 0 after one failed for unavailability")
STORE_UNAVAILABLE = Counter(
    "tapproof_store_unavailable", "Transactions that failed: database unreachable or unreadable"
)

RETRIES = 5
"""Attempts for a PostgreSQL transaction that hits a serialization failure or deadlock."""

_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
_WRITE = "tapproof_write"
_FILE_ID = "tapproof_file_id"


def parse_url(url: str) -> URL:
    """Parse and normalise a store URL (``postgresql://`` becomes ``postgresql+psycopg://``).

    Raises :class:`~tapproof.errors.ConfigError` for anything but a SQLite file
    or PostgreSQL.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        # not the parser's text: it repeats the URL, password included
        raise ConfigError("--db: not a database url (expected sqlite:///PATH or postgresql://...)") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise ConfigError(f"--db: unsupported postgresql driver {driver!r} (use postgresql://)")
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ConfigError(f"--db: unsupported sqlite driver {driver!r} (use sqlite:///PATH)")
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError("--db: an in-memory sqlite database cannot be shared; use sqlite:///PATH")
        return parsed.set(drivername="sqlite+pysqlite")
    raise ConfigError(f"--db: unsupported database {backend!r} (use sqlite:///PATH or postgresql://)")


def redact(url: URL) -> str:
    """Render ``url`` without its password, for messages and logs."""
    return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)


def make_engine(url: URL) -> sa.Engine:
    """Create the one engine (and connection pool) a store shares between threads."""
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, pool_size=5, max_overflow=20, pool_timeout=60)
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {"application_name": "tapproof"}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=20,
        pool_timeout=PG_POOL_TIMEOUT_S,
        connect_args=connect_args,
    )


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the database file if it is still there and readable and writable, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.R_OK | os.W_OK):
        return None
    return st.st_dev, st.st_ino


def _configure_sqlite(engine: sa.Engine) -> None:
    path = str(engine.url.database)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()
        record.info[_FILE_ID] = _file_id(path)

    @event.listens_for(engine, "checkout")
    def _on_checkout(_dbapi_conn: sqlite3.Connection, record: Any, _proxy: Any) -> None:
        # SQLite's pre-ping: a pooled connection keeps the file it opened, so a database
        # file moved, replaced or made unreadable would go unnoticed (or serve stale data).
        # Drop the connection; the pool reconnects to the path (and fails while it is unusable).
        now = _file_id(path)
        if now is None or now != record.info.get(_FILE_ID):
            raise sa.exc.DisconnectionError(f"{path} was moved, replaced or is not readable and writable")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def run_tx(
    engine: sa.Engine,
    fn: Callable[[sa.Connection], T],
    *,
    write: bool,
    what: str,
    isolation: str | None = None,
) -> T:
    """Run ``fn(conn)`` in one transaction and return its result.

    ``write`` makes SQLite take the write lock at ``BEGIN``. ``isolation``
    (e.g. ``"REPEATABLE READ"``) applies on PostgreSQL only; SQLite transactions
    are serializable already. Exceptions that ``fn`` raises on purpose (store
    errors, ``EnrollmentRefused``, a signing callback's error) roll back and
    propagate unchanged; driver errors become store errors.
    """
    postgres = engine.dialect.name == "postgresql"
    for attempt in range(1, RETRIES + 1):
        try:
            with engine.connect() as conn:
                options: dict[str, Any] = {_WRITE: write}
                if isolation and postgres:
                    options["isolation_level"] = isolation
                conn.execution_options(**options)
                with conn.begin():
                    result = fn(conn)
            _health.mark(True, what, "")
            return result
        except sa.exc.DBAPIError as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None)
            if postgres and sqlstate in _RETRY_SQLSTATES and attempt < RETRIES:
                log_event(log, "store-retry", level=logging.DEBUG, what=what, sqlstate=sqlstate)
                time.sleep(random.uniform(0.005, 0.02) * attempt)  # noqa: S311 - jitter, not crypto
                continue
            raise _health.seen(translate(exc, what, engine.url)) from exc
        except (sa.exc.SQLAlchemyError, sqlite3.Error, psycopg.Error) as exc:
            raise _health.seen(translate(exc, what, engine.url)) from exc
    raise AssertionError("unreachable")  # pragma: no cover


class _Health:
    """Database up/down as the last transaction saw it: the gauge and one log line per transition."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._up: bool | None = None

    def mark(self, up: bool, what: str, reason: str) -> None:
        """Record an outcome; log when it changes the state.

        ``store-down`` is logged only when a database that worked in this process
        stops working. A failure before any transaction succeeded (a server
        starting on a corrupt file, a one-shot command) is reported once, by the
        caller that gets the :class:`~tapproof.errors.StoreUnavailable`: the CLI
        prints one ``tapproof: error:`` line, not a JSON line before it.
        """
        with self._lock:
            before = self._up
            if up or before is not None:  # never seen up: stay unknown, so a later success logs no store-up
                self._up = up
        STORE_UP.set(1 if up else 0)
        if not up:
            STORE_UNAVAILABLE.inc()
            if before is True:
                log_event(log, "store-down", level=logging.ERROR, what=what, reason=reason)
        elif before is False:
            log_event(log, "store-up", level=logging.WARNING, what=what)

    def seen(self, exc: Exception) -> Exception:
        """Pass ``exc`` through, marking the database down if it is an unavailability."""
        if isinstance(exc, StoreUnavailable):
            self.mark(False, "", str(exc))
        return exc


_health = _Health()


def translate(exc: BaseException, what: str, url: URL) -> Exception:
    """Map a SQLAlchemy or driver error to the store error tree (or a programming error)."""
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        if isinstance(exc.orig, ValueError | TypeError):
            return exc.orig  # a naive datetime or a value that is not JSON: our caller's bug
        return StoreError(f"{what}: {exc}")
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    reason = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    where = redact(url)
    if isinstance(exc, sa.exc.IntegrityError) or isinstance(orig, sqlite3.IntegrityError | psycopg.IntegrityError):
        return Conflict(f"{what}: {reason}")
    if isinstance(orig, sqlite3.DatabaseError) and ("not a database" in reason or "malformed" in reason):
        return StoreUnavailable(f"{what}: {where} is corrupt or not a sqlite database ({reason})")
    if isinstance(
        exc,
        sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError | sa.exc.DisconnectionError,
    ) or isinstance(orig, sqlite3.OperationalError | psycopg.OperationalError):
        return StoreUnavailable(f"{what}: cannot use {where}: {reason}")
    if type(orig) is sqlite3.DatabaseError:
        return StoreUnavailable(f"{what}: cannot use {where}: {reason}")
    return StoreError(f"{what}: {reason}")
