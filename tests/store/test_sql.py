"""What the SQL store does beyond the protocol: URLs, schema versions, locking, failures."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import pwd
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from tapproof.errors import (
    ConfigError,
    EnrollmentRefused,
    NotFound,
    SchemaMismatch,
    StoreUnavailable,
    TokenReason,
)
from tapproof.store import SCHEMA_VERSION, ServiceRecord, SQLStore, migrate, migrations, open_store, schema
from tapproof.store.engine import RETRIES, SQLITE_BUSY_TIMEOUT_MS, make_engine, parse_url, run_tx
from tests.helpers import free_port, is_root
from tests.pgserver import PgServer
from tests.store.conformance import T0, cert, enroll, issuer, run_threads, svc, token


def raw_engine(url: str) -> sa.Engine:
    """An engine that bypasses the store (to tamper with the database)."""
    return sa.create_engine(parse_url(url))


# --- URLs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u@h/db",
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql+asyncpg://u@h/db",
        "not a url",
    ],
)
def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_store(url)


def test_postgres_urls_use_psycopg() -> None:
    assert parse_url("postgresql://u:pw@h:5/db").drivername == "postgresql+psycopg"
    assert parse_url("postgres://u@h/db").drivername == "postgresql+psycopg"


# --- schema versions -----------------------------------------------------------


def test_empty_database_refused_without_migrate(db_url: str) -> None:
    with pytest.raises(SchemaMismatch, match="tapproof server migrate"):
        open_store(db_url)


def test_missing_sqlite_file_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(SchemaMismatch):
        open_store(f"sqlite:///{path}")
    assert not path.exists()


def test_migrate_from_empty_then_nothing_to_do(db_url: str) -> None:
    assert migrate(db_url) == (0, SCHEMA_VERSION)
    assert migrate(db_url) == (SCHEMA_VERSION, SCHEMA_VERSION)
    with open_store(db_url) as store:
        assert store.schema_version() == SCHEMA_VERSION
    with open_store(db_url, migrate=True) as store:
        assert store.schema_version() == SCHEMA_VERSION


def test_newer_schema_refused(db_url: str) -> None:
    migrate(db_url)
    engine = raw_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO tapproof_schema (version, name, applied_at) VALUES (:v, 'future', :t)"),
            {"v": SCHEMA_VERSION + 1, "t": "2030-01-01T00:00:00.000000Z" if "sqlite" in db_url else T0},
        )
    engine.dispose()
    with pytest.raises(SchemaMismatch, match="tapproof server migrate"):
        open_store(db_url)
    with pytest.raises(SchemaMismatch):
        open_store(db_url, migrate=True)
    with pytest.raises(SchemaMismatch):
        migrate(db_url)


def test_v3_database_migrates_to_v4(db_url: str) -> None:
    """An existing v3 database (made by the v1-v3 migrations, with data) is refused until migrated, then
    keeps its data and gets the registry version and the revoked-rows indexes."""
    engine = make_engine(parse_url(db_url))

    def upto_v3(conn: sa.Connection) -> None:
        for version, name, fn in migrations.MIGRATIONS[:3]:
            fn(conn)
            conn.execute(schema.schema_versions.insert().values(version=version, name=name, applied_at=T0))
        common = {"created_at": T0, "revoke_reason": "", "advertise": "10.0.0.1:7444"}
        conn.execute(schema.hosts.insert(), [{"name": "web1", "spiffe_id": "x", **common}])
        conn.execute(schema.hosts.insert(), [{"name": "web2", "spiffe_id": "y", **common, "revoked_at": T0}])

    try:
        run_tx(engine, upto_v3, write=True, what="build a v3 database")
    finally:
        engine.dispose()
    with pytest.raises(SchemaMismatch, match="schema version 3, this tapproof needs version 4"):
        open_store(db_url)
    assert migrate(db_url) == (3, 4)
    with open_store(db_url) as store:
        assert store.schema_version() == 4
        assert [h.name for h in store.list_hosts()] == ["web1", "web2"]
        assert store.revoked_hosts() == ["web2"]
        version = store.registry_version()
        assert version.counter == 0
        store.update_host_seen("web1", T0, advertise="10.0.0.1:7445")
        assert store.registry_version().counter == 1
        names = {ix["name"] for t in ("hosts", "certificates") for ix in sa.inspect(store._engine).get_indexes(t)}
    assert {"hosts_revoked", "certificates_revoked"} <= names
    assert migrate(db_url) == (4, 4)


def test_two_stores_on_one_database_see_each_others_registry_changes(db_url: str) -> None:
    """What several servers on one database rely on: a bump through one handle is read by the other."""
    a, b = open_store(db_url, migrate=True), open_store(db_url)
    try:
        assert a.registry_version() == b.registry_version()
        enroll(a, "web1", "01")
        assert b.registry_version() == a.registry_version()
        assert b.registry_snapshot().hosts == a.list_hosts()
        before = a.registry_version().counter
        b.register_services("web1", [svc("redis", "web1")])
        assert a.registry_version().counter == before + 1
        assert a.registry_snapshot().services == [svc("redis", "web1")]
        a.revoke_host("web1", T0, "gone")
        assert b.registry_version().counter == before + 2
        assert b.revoked_hosts() == ["web1"]
    finally:
        a.close()
        b.close()


def test_sqlite_revocation_queries_read_only_revoked_rows(tmp_path: Path) -> None:
    """The plan of the statements ``revoked_hosts`` and ``revoked_serials`` run: the partial indexes, no scan."""
    with open_store(f"sqlite:///{tmp_path / 'a.db'}", migrate=True) as store:
        seen: list[tuple[str, object]] = []

        @sa.event.listens_for(store._engine, "before_cursor_execute")
        def record(_c: object, _cur: object, statement: str, params: object, _ctx: object, _many: bool) -> None:
            seen.append((statement, params))

        store.revoked_hosts()
        store.revoked_serials(T0)
        queries = [(q, p) for q, p in seen if q.lstrip().upper().startswith("SELECT")]
        assert len(queries) == 2, queries
        engine = raw_engine(store.url)
        try:
            with engine.connect() as conn:
                plans = [
                    " ".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + q, p)) for q, p in queries
                ]
        finally:
            engine.dispose()
    assert "USING INDEX hosts_revoked" in plans[0], plans
    assert "USING INDEX certificates_revoked" in plans[1], plans
    assert not any("SCAN" in p for p in plans), plans


# --- guarantees the protocol leaves to the backend ---------------------------------


def test_audit_log_is_append_only_in_the_database(store: SQLStore) -> None:
    entry_id = store.append_audit(T0, "admin", "token-create", {"host": "web1"})
    engine = raw_engine(store.url)  # test URLs carry no password, so the redacted URL is the real one
    try:
        for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
            with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()
    assert [(e.entry_id, e.actor) for e in store.list_audit()] == [(entry_id, "admin")]


def test_two_stores_on_one_database_redeem_once(db_url: str) -> None:
    stores = [open_store(db_url, migrate=True), open_store(db_url)]
    try:
        stores[0].add_token(token("t1"))
        wins: list[int] = []
        reasons: list[TokenReason] = []

        def redeem(i: int) -> None:
            try:
                stores[i % 2].redeem_token("t1", T0, issuer(f"{i:02x}"))
                wins.append(i)
            except EnrollmentRefused as exc:
                reasons.append(exc.reason)

        run_threads(20, redeem)
        assert len(wins) == 1
        assert reasons == [TokenReason.USED] * 19
    finally:
        for s in stores:
            s.close()


def test_naive_datetimes_are_refused(store: SQLStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.record_certificate(cert("01", not_after=dt.datetime(2026, 1, 1)))
    with pytest.raises(NotFound):
        store.get_certificate("01")


def test_audit_detail_must_be_json(store: SQLStore) -> None:
    with pytest.raises(TypeError):
        store.append_audit(T0, "admin", "x", {"when": T0})
    assert store.list_audit() == []


def test_update_host_seen_unknown_host_not_found(store: SQLStore) -> None:
    with pytest.raises(NotFound):
        store.update_host_seen("ghost", T0)


def test_register_services_refuses_records_for_another_host(store: SQLStore) -> None:
    with pytest.raises(ValueError, match="not on host"):
        store.register_services("web1", [ServiceRecord("redis", "web2", "web2:6379", T0)])


# --- SQLite specifics ----------------------------------------------------------


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 'a.db'}", migrate=True) as store:
        assert store.dialect == "sqlite"
        engine = store._engine
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS
        store.record_certificate(cert("01"))
        with engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT typeof(issued_at), issued_at FROM certificates").one()
        assert tuple(row) == ("text", "2026-01-01T12:00:00.000000Z")  # sortable UTC text


def test_sqlite_missing_directory_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:///{tmp_path / 'nope' / 'a.db'}", migrate=True)
    with pytest.raises(StoreUnavailable):
        migrate(f"sqlite:///{tmp_path / 'nope' / 'a.db'}")


def test_sqlite_path_is_a_directory_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:///{tmp_path / 'dir.db'}")


def test_sqlite_garbage_file_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreUnavailable, match="corrupt"):
        open_store(f"sqlite:///{path}")
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:///{path}", migrate=True)


def test_sqlite_corrupt_pages_raise_store_errors_only(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    url = f"sqlite:///{path}"
    with open_store(url, migrate=True) as store:
        for i in range(50):
            store.record_certificate(cert(f"{i:04x}"))
    data = bytearray(path.read_bytes())
    data[100:] = os.urandom(len(data) - 100)  # keep the header, scramble every page
    path.write_bytes(bytes(data))
    outcomes: list[type[BaseException]] = []
    attempts: list[Callable[[SQLStore], object]] = [
        lambda s: s.list_hosts(),
        lambda s: s.get_certificate("0001"),
        lambda s: s.record_certificate(cert("ffff")),
    ]
    for attempt in attempts:
        try:
            with open_store(url) as store:
                attempt(store)
        except (StoreUnavailable, SchemaMismatch) as exc:
            outcomes.append(type(exc))
    assert outcomes, "a scrambled database must not look healthy"


def _as_unprivileged(fn: Callable[[], object]) -> str:
    """Run ``fn`` in a child as ``nobody`` (when root); return the raised error's class name or "ok"."""
    if not is_root():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by name
            return type(exc).__name__
        return "ok"
    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        outcome = "ok"
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by name
            outcome = type(exc).__name__
        os.write(write_fd, pickle.dumps(outcome))
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return str(pickle.loads(data))  # noqa: S301 - our own child


def test_sqlite_read_only_directory_unavailable(tmp_path: Path) -> None:
    # As root the check runs in a child that drops to nobody, so the directory must be
    # reachable by nobody: pytest's own temp dirs are private to root.
    base = Path(tempfile.mkdtemp(prefix="tapproof-ro-")) if is_root() else tmp_path
    ro = base / "ro"
    ro.mkdir()
    try:
        with open_store(f"sqlite:///{ro / 'existing.db'}", migrate=True):
            pass
        for p in ro.iterdir():
            if p.name != "existing.db":
                p.unlink()
        (ro / "existing.db").chmod(0o444)
        ro.chmod(0o555)
        base.chmod(0o755)
        fresh = _as_unprivileged(lambda: open_store(f"sqlite:///{ro / 'new.db'}", migrate=True).close())
        existing = _as_unprivileged(lambda: open_store(f"sqlite:///{ro / 'existing.db'}").list_hosts())
        hidden = _as_unprivileged(lambda: open_store("sqlite:////root/tapproof-absent/a.db").close())
    finally:
        ro.chmod(0o755)
        if base is not tmp_path:
            shutil.rmtree(base)
    assert fresh == "StoreUnavailable"
    assert existing == "StoreUnavailable"
    assert hidden == "StoreUnavailable" if is_root() else hidden in ("StoreUnavailable", "SchemaMismatch")


# --- PostgreSQL specifics --------------------------------------------------------


@pytest.mark.postgres
def test_postgres_times_are_timestamptz(pg_url: str) -> None:
    with open_store(pg_url, migrate=True) as store:
        assert store.dialect == "postgresql"
    engine = raw_engine(pg_url)
    with engine.connect() as conn:
        types = set(
            conn.execute(
                sa.text(
                    "SELECT DISTINCT data_type FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND column_name IN "
                    "('created_at', 'expires_at', 'not_after', 'ts', 'revoked_at')"
                )
            ).scalars()
        )
    engine.dispose()
    assert types == {"timestamp with time zone"}


@pytest.mark.postgres
def test_postgres_nothing_listening_unavailable() -> None:
    url = f"postgresql://tapproof@127.0.0.1:{free_port()}/tapproof"
    with pytest.raises(StoreUnavailable):
        open_store(url)
    with pytest.raises(StoreUnavailable):
        migrate(url)


@pytest.mark.postgres
def test_postgres_server_stopped_then_back(pg_server: PgServer, pg_url: str) -> None:
    store = open_store(pg_url, migrate=True)
    try:
        store.add_token(token("t1"))
        pg_server.stop()
        try:
            for op in (
                store.list_hosts,
                lambda: store.add_token(token("t2")),
                lambda: store.redeem_token("t1", T0, issuer()),
                lambda: open_store(pg_url),
            ):
                with pytest.raises(StoreUnavailable):
                    op()
        finally:
            pg_server.start()
        store.redeem_token("t1", T0, issuer())  # the pool recovers by itself
        assert [h.name for h in store.list_hosts()] == ["web1"]
    finally:
        store.close()


def _serialization_failure(conn: sa.Connection) -> None:
    conn.exec_driver_sql(
        "DO $$ BEGIN RAISE EXCEPTION USING MESSAGE = 'conflict', ERRCODE = 'serialization_failure'; END $$"
    )


@pytest.mark.postgres
def test_postgres_serialization_failures_are_retried(pg_url: str) -> None:
    calls: list[int] = []

    def flaky(conn: sa.Connection) -> str:
        calls.append(1)
        if len(calls) < 3:
            _serialization_failure(conn)
        return "done"

    def hopeless(conn: sa.Connection) -> None:
        calls.append(1)
        _serialization_failure(conn)

    with open_store(pg_url, migrate=True) as store:
        assert run_tx(store._engine, flaky, write=True, what="flaky") == "done"
        assert len(calls) == 3
        calls.clear()
        with pytest.raises(StoreUnavailable):
            run_tx(store._engine, hopeless, write=True, what="hopeless")
        assert len(calls) == RETRIES
