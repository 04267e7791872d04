"""A private, throw-away PostgreSQL server for tests.

``start_postgres(tmpdir)`` runs ``initdb`` + ``pg_ctl start`` into a fresh
directory, listening only on 127.0.0.1 on a free port (and on a Unix socket in
that directory), with durability off for speed. It never touches a system
instance. As root it runs the server as the ``postgres`` user (or creates an
unprivileged ``tapproof-pg`` user), because ``initdb`` refuses to run as root;
the data directory then lives in a ``mkdtemp`` under the system temp dir,
owned by that user, since pytest's own temp dirs are private to root.

Reuse from any test package::

    from tests.pgserver import pg_server, pg_url  # noqa: F401  (fixtures)

``pg_server`` (session) is the running :class:`PgServer`; ``pg_url``
(function) is the URL of a fresh, empty database on it, dropped afterwards.
Both call ``tests.helpers.require`` when PostgreSQL is not installed, so they
skip locally and fail under ``TAPPROOF_FULL=1``.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.helpers import free_port, is_root, require

USER = "tapproof"  # the database superuser initdb creates (trust auth on 127.0.0.1)
_SERVICE_ACCOUNTS = ("postgres", "tapproof-pg")


def find_pg_bin() -> Path | None:
    """Return the directory holding initdb and pg_ctl (PATH first, then Debian's layout)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
    )
    for cand in reversed(candidates):
        if (Path(cand) / "initdb").exists() and (Path(cand) / "pg_ctl").exists():
            return Path(cand)
    return None


def _service_account() -> str:
    """An unprivileged account to run the server as (root only)."""
    for name in _SERVICE_ACCOUNTS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    name = _SERVICE_ACCOUNTS[-1]
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return name


class PgServer:
    """A running private PostgreSQL; ``url`` points at its ``postgres`` database."""

    def __init__(self, bindir: Path, root: Path, run_as: str | None, *, owns_root: bool) -> None:
        """Prepare (do not start) a server in ``root``; use :func:`start_postgres`."""
        self.bindir = bindir
        self.root = root
        self.datadir = root / "data"
        self.logfile = root / "postgres.log"
        self.run_as = run_as
        self.port = 0
        self._owns_root = owns_root
        self._names = itertools.count(1)

    @property
    def url(self) -> str:
        """``postgresql://tapproof@127.0.0.1:PORT/postgres``."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """The URL of ``database`` on this server."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / tool), *args]
        if self.run_as:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=120)

    def _check(self, proc: subprocess.CompletedProcess[str], what: str) -> None:
        if proc.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""
            raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr}\n{log}")

    def init(self) -> None:
        """Run initdb (trust auth, no fsync)."""
        self._check(
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ),
            "initdb",
        )

    def start(self) -> None:
        """Start the server (on a new free port the first time, the same one afterwards)."""
        attempts = 1 if self.port else 3
        for _ in range(attempts):
            if not self.port or attempts > 1:
                self.port = free_port()
            opts = " ".join(
                [
                    f"-p {self.port}",
                    "-c listen_addresses=127.0.0.1",
                    f"-c unix_socket_directories={self.root}",
                    "-c fsync=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                ]
            )
            proc = self._run(
                "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60",
                "-o", opts, "start",
            )  # fmt: skip
            if proc.returncode == 0:
                return
        self._check(proc, "pg_ctl start")

    def stop(self) -> None:
        """Stop the server at once (``pg_ctl stop -m immediate``); data stays for :meth:`start`."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            shutil.rmtree(self.datadir, ignore_errors=True)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database; return its URL."""
        name = name or f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url_for(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` (closing its connections)."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_postgres(tmpdir: Path) -> PgServer:
    """Start a private PostgreSQL under ``tmpdir`` (or a mkdtemp when root); see the module doc.

    Calls ``require(False, ...)`` when initdb/pg_ctl cannot be found.
    """
    bindir = find_pg_bin()
    require(bindir is not None, "needs PostgreSQL (initdb/pg_ctl)")
    assert bindir is not None
    if is_root():
        account = _service_account()
        root = Path(tempfile.mkdtemp(prefix="tapproof-pg-"))
        pw = pwd.getpwnam(account)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        server = PgServer(bindir, root, account, owns_root=True)
    else:
        root = Path(tmpdir)
        root.mkdir(parents=True, exist_ok=True)
        server = PgServer(bindir, root, None, owns_root=False)
    try:
        server.init()
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """A private PostgreSQL for the whole session (stopped with ``-m immediate`` at the end)."""
    server = start_postgres(tmp_path_factory.mktemp("pg"))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """URL of a fresh, empty database on :func:`pg_server`, dropped after the test."""
    url = pg_server.create_database()
    try:
        yield url
    finally:
        with contextlib.suppress(psycopg.Error):
            pg_server.drop_database(url)
