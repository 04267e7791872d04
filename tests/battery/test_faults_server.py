"""Faults of the control plane and its SQLite database, with real agents and in-process clients.

One server per module (leaf lifetime 1 minute) whose SQLite database lives on
a 16 MiB tmpfs (``--db sqlite:///MOUNT/tapproof.db``, as root):

* ``kill -9`` of the server while many enrollments and renewals (certificate
  issuance) are in flight: back within 10 s of the restart; no serial issued
  twice; no token spent without its host record and certificate; every serial
  a client received is recorded; clients that got an error retry successfully
  (an enrollment with the same join string, even when its token was spent and
  the answer lost: the agent kept its key and the server accepts the same key).
* The database file unreadable (moved away, a directory in its place) while
  agents hold a tunnel: the API answers 503 ``store-unavailable``, nothing is
  issued, tunnels (live and new) are unaffected, and it recovers without a restart.
* The disk under the database full: issuance fails cleanly (503), nothing is
  half-written (integrity check; recorded = delivered), recovery once space is back.

Invariants of :mod:`tests.battery.invariants` after each (API and tunnel ports captured).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapproof.agent.enroll import enroll
from tapproof.agent.renew import client_for, renew
from tapproof.agent.state import AgentPaths, load_credentials
from tapproof.clock import SystemClock
from tapproof.control import admin
from tapproof.control import config as server_config
from tapproof.errors import APIError, TapproofError
from tapproof.pki.certs import serial_hex
from tapproof.store import open_store
from tests.battery.invariants import HashEcho, check_transfer, checked, stream
from tests.battery.test_faults_disk import fill, free, tiny_tmpfs
from tests.helpers import require_root, require_tool
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.root, pytest.mark.tcpdump]

BACK_BOUND = 10.0
"""Seconds from the restart of a killed server to its API answering again."""


@dataclasses.dataclass
class Ctx:
    """The module's server and where its database lives."""

    srv: procs.ServerProc
    fs: Path  # the tmpfs holding the database
    db: Path

    @property
    def api_port(self) -> int:
        return int(self.srv.listen.rsplit(":", 1)[1])

    def token(self, host: str) -> str:
        """A join string, made in-process through the admin API (fast)."""
        return str(
            admin.admin_client(self.srv.data_dir, SystemClock()).post("/v1/tokens", {"host": host, "ttl": "15m"})[
                "join"
            ]
        )

    def store_url(self) -> str:
        return server_config.load(self.srv.data_dir).db


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    require_root()
    require_tool("tcpdump")
    tmp = tmp_path_factory.mktemp("server-faults")
    with tiny_tmpfs(tmp / "dbfs", size="16m") as fs:
        db = fs / "tapproof.db"
        srv = procs.start_server(tmp / "srv", leaf_ttl="1m", db=f"sqlite:///{db}")
        try:
            yield Ctx(srv, fs, db)
        finally:
            srv.stop()


def _serial(paths: AgentPaths) -> str:
    return serial_hex(load_credentials(paths).leaf)


def _check_store(ctx: Ctx, delivered: dict[str, str]) -> None:
    """No token spent without its host and certificate; every delivered serial recorded, for its host; no duplicate."""
    store = open_store(ctx.store_url())
    try:
        now = dt.datetime.now(dt.UTC)
        for tok in store.list_tokens(include_used=True):
            if tok.used_at is None:
                continue
            host = store.get_host(tok.host)
            assert host.enrolled_at is not None, f"token for {tok.host} spent, host never enrolled"
            assert store.latest_certificate(tok.host) is not None, f"token for {tok.host} spent, no certificate"
        for serial, host_name in delivered.items():
            rec = store.get_certificate(serial)
            assert rec.host == host_name, (serial, rec.host, host_name)
        serials = [c.serial for c in store.unexpired_certificates(now)]
        assert len(serials) == len(set(serials)), "a serial recorded twice"
    finally:
        store.close()


def test_kill9_server_during_enrollment_and_issuance(ctx: Ctx, tmp_path: Path) -> None:
    srv = ctx.srv
    renewers = []
    for i in range(6):
        enroll(tmp_path / f"r{i}", ctx.token(f"kr{i}"))
        renewers.append(AgentPaths(tmp_path / f"r{i}"))
    joins = {f"ke{i}": ctx.token(f"ke{i}") for i in range(30)}
    delivered: dict[str, str] = {}  # serial -> host, every certificate a client received
    lock = threading.Lock()
    enrolled: dict[str, str] = {}  # host -> "ok" or the error
    renew_errors: dict[int, str] = {}
    stop = threading.Event()

    with checked(tmp_path) as inv:
        inv.capture_lo([ctx.api_port])
        inv.watch("server", srv.proc.pid, log=srv.log_path)

        def enroller(name: str) -> None:
            try:
                creds = enroll(tmp_path / name, joins[name])
                with lock:
                    delivered[serial_hex(creds.leaf)] = name
                    enrolled[name] = "ok"
            except TapproofError as exc:
                enrolled[name] = str(exc)

        def renewer(i: int) -> None:
            for _ in range(200):  # bounded; stops at the first error (the server died) or when told
                if stop.is_set():
                    return
                try:
                    creds = renew(renewers[i], dt.datetime.now(dt.UTC))
                except TapproofError as exc:
                    renew_errors[i] = str(exc)
                    return
                with lock:
                    delivered[serial_hex(creds.leaf)] = f"kr{i}"

        threads = [threading.Thread(target=renewer, args=(i,), daemon=True) for i in range(len(renewers))]
        threads += [threading.Thread(target=enroller, args=(n,), daemon=True) for n in joins]
        for t in threads:
            t.start()
        procs.wait_for(lambda: sum(v == "ok" for v in enrolled.values()) >= 3 and len(delivered) >= 8, 30, "load")
        srv.kill()  # SIGKILL, mid-load
        inv.forget("server")
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        failed = [n for n in joins if enrolled.get(n) != "ok"]
        assert failed or renew_errors, "the kill hit no request in flight"

        t0 = time.monotonic()
        srv.restart()
        probe = admin.admin_client(srv.data_dir, SystemClock())
        procs.wait_for(lambda: _answers(probe), BACK_BOUND, "the API after the restart", step=0.05)
        back = time.monotonic() - t0
        inv.watch("server", srv.proc.pid, log=srv.log_path)
        _check_store(ctx, delivered)

        # clients that got an error retry: a renewal with the same pair; an enrollment with the same join
        # string, which reuses the key it saved, so a token spent with its answer lost is redeemed again
        for i, paths in enumerate(renewers):
            creds = renew(paths, dt.datetime.now(dt.UTC))
            delivered[serial_hex(creds.leaf)] = f"kr{i}"
        for name in failed:
            creds = enroll(tmp_path / name, joins[name])
            assert not list((tmp_path / name).glob(".enroll-pending-*.pem")), "pending key left after enrolling"
            delivered[serial_hex(creds.leaf)] = name
        lost = srv.log_path.read_text(errors="replace").count('"event":"enroll-repeated"')
        _check_store(ctx, delivered)
    print(
        f"kill -9 under load: {len(failed)} enrollments and {len(renew_errors)} renewals cut, "
        f"{lost} tokens spent with the answer lost and redeemed again by the same key; "
        f"API back {back:.2f}s after the restart; "
        f"{len(delivered)} serials delivered, all recorded, none twice"
    )
    assert back <= BACK_BOUND


def _answers(client: object) -> bool:
    try:
        client.get("/v1/bundle")  # type: ignore[attr-defined]
    except TapproofError:
        return False
    return True


def test_sqlite_unreadable_while_agents_hold_tunnels(ctx: Ctx, tmp_path: Path) -> None:
    srv = ctx.srv
    echo = HashEcho()
    a = b = None
    try:
        b = procs.start_agent(tmp_path / "b", ctx.token("b"), "--service", f"echo=127.0.0.1:{echo.port}")
        a = procs.start_agent(
            tmp_path / "a", ctx.token("a"), "--route", "127.0.0.1:0=echo@b", "--renew-fraction", "0.1"
        )
        procs.wait_for(lambda: "b" in a.status()["registry_hosts"], 15, "a to learn b")
        late = ctx.token("ulate")  # made before the outage, redeemed during (refused) and after (works)
        pid = srv.proc.pid
        away = ctx.db.with_name("tapproof.db.away")
        with checked(tmp_path) as inv:
            inv.capture_lo([a.tunnel[1], b.tunnel[1], ctx.api_port])
            inv.watch("server", pid, log=srv.log_path)
            inv.watch("a", a.proc.pid, log=a.log_path, metrics=f"http://{a.addresses['admin']}/metrics")
            inv.watch("b", b.proc.pid, log=b.log_path, metrics=f"http://{b.addresses['admin']}/metrics")
            stop = threading.Event()
            long: dict[str, object] = {}
            t_long = threading.Thread(
                target=lambda: long.update(end=stream(a.route(), 1 << 40, chunk=64 << 10, interval=0.02, stop=stop)),
                daemon=True,
            )
            t_long.start()
            serial = a.status()["certificate"]["serial"]
            failures = a.metric("tapproof_agent_renewals_total", result="failure")

            ctx.db.rename(away)
            ctx.db.mkdir()  # the path is there but is no database: unreadable for root too
            t_out = time.monotonic()
            try:
                with pytest.raises(APIError) as ei:
                    client_for(AgentPaths(tmp_path / "a")).get("/v1/registry")
                assert (ei.value.status, ei.value.code) == (503, "store-unavailable")
                with pytest.raises(APIError) as ei:
                    enroll(tmp_path / "late", late)
                assert (ei.value.status, ei.value.code) == (503, "store-unavailable")
                assert not (tmp_path / "late").exists() or not AgentPaths(tmp_path / "late").enrolled()
                procs.wait_for(
                    lambda: a.metric("tapproof_agent_renewals_total", result="failure") > failures,
                    20,
                    "a failed renewal",
                )
                assert a.status()["certificate"]["serial"] == serial  # nothing issued
                for _ in range(3):  # new tunnels keep working
                    end = stream(a.route(), 1 << 20, timeout=10)
                    assert end.error is None, end.error
                    assert end.received == 1 << 20
                outage = time.monotonic() - t_out
            finally:
                ctx.db.rmdir()
                away.rename(ctx.db)
            t_back = time.monotonic()
            procs.wait_for(lambda: a.status()["certificate"]["serial"] != serial, 30, "a renewal after", step=0.2)
            renewed_after = time.monotonic() - t_back
            creds = enroll(tmp_path / "late", late)  # the token was not spent by the refused attempt
            assert srv.proc.pid == pid, "the server was restarted"
            assert "store-down" in srv.log()
            assert "store-up" in srv.log()
            stop.set()
            t_long.join(30)
            end = long["end"]
            service = max(echo.wait_ended(len(echo.ends)), key=lambda e: e.received)
            assert check_transfer(end, service) == "complete"  # type: ignore[arg-type]
            _check_store(ctx, {serial_hex(creds.leaf): "ulate", a.status()["certificate"]["serial"]: "a"})
        print(
            f"sqlite unreadable {outage:.1f}s: 503 store-unavailable, renewals refused, tunnels unaffected "
            f"(long stream {end.received >> 20} MiB complete); renewed {renewed_after:.2f}s after the file came back"  # type: ignore[attr-defined]
        )
    finally:
        for p in (a, b):
            if p is not None:
                p.stop()
        echo.close()


def test_disk_full_under_server_database(ctx: Ctx, tmp_path: Path) -> None:
    srv = ctx.srv
    first = enroll(tmp_path / "r", ctx.token("dfull"))
    paths = AgentPaths(tmp_path / "r")
    late = ctx.token("dlate")
    delivered: dict[str, str] = {serial_hex(first.leaf): "dfull"}
    errors: list[APIError] = []
    with checked(tmp_path) as inv:
        inv.capture_lo([ctx.api_port])
        inv.watch("server", srv.proc.pid, log=srv.log_path)
        fill(ctx.fs)
        try:
            deadline = time.monotonic() + 60
            for _ in range(300):  # bounded; the WAL may absorb some writes before the disk bites
                try:
                    creds = renew(paths, dt.datetime.now(dt.UTC))
                    delivered[serial_hex(creds.leaf)] = "dfull"
                except APIError as exc:
                    errors.append(exc)
                    if len(errors) >= 3:
                        break
                assert time.monotonic() < deadline, "no failure within 60 s of a full disk"
            assert errors, "renewals never failed on a full disk"
            assert {(e.status, e.code) for e in errors} == {(503, "store-unavailable")}, errors
            with pytest.raises(APIError) as ei:
                enroll(tmp_path / "late", late)
            assert (ei.value.status, ei.value.code) == (503, "store-unavailable")
            before_free = _serial(paths)
            assert "database or disk is full" in srv.log(), "the server logged no reason"
        finally:
            free(ctx.fs)
        creds = procs.wait_for(lambda: _try_renew(paths), 30, "a renewal once space is back", step=0.5)
        delivered[serial_hex(creds.leaf)] = "dfull"
        assert serial_hex(creds.leaf) != before_free
        enroll(tmp_path / "late", late)
        assert srv.proc.poll() is None
    # nothing half-written: the file is sound and every certificate recorded for the host was delivered
    con = sqlite3.connect(f"file:{ctx.db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()
    _check_store(ctx, delivered)
    store = open_store(ctx.store_url())
    try:
        recorded = {c.serial for c in store.unexpired_certificates(dt.datetime.now(dt.UTC)) if c.host == "dfull"}
    finally:
        store.close()
    assert recorded == set(delivered), "a certificate recorded but never delivered (or the reverse)"
    print(f"disk full: {len(delivered) - 2} renewals went through, then {len(errors)} refused 503; recovered")


def _try_renew(paths: AgentPaths) -> object:
    try:
        return renew(paths, dt.datetime.now(dt.UTC))
    except TapproofError:
        return None
