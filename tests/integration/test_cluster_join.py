"""Servers joining one cluster on a real PostgreSQL, each with its own intermediate under the shared root.

End to end, with the real CLI and real processes (docs/rotation.md, "A cluster
with an offline root"):

* ``s1``: ``server init --db postgresql://...`` (root + its intermediate);
* ``s2``: ``server init --join-cluster``; it refuses to run until
  ``server ca sign-intermediate`` runs on ``s1``'s data dir (root key online);
* the root key then leaves ``s1``'s data dir; ``s3`` joins, and signing needs
  ``--root-key FILE`` (without it: a clear refusal naming the flag);
* all three run; an agent enrolled through each gets a leaf under THAT
  server's intermediate; agents tunnel to each other both ways (each trusts
  the other's chain); ``token create`` on any server lists every server;
* three ``server ca rotate prepare`` at once leave one prepared root (also on
  SQLite, below).
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tapproof.clock import SystemClock
from tapproof.control import admin
from tapproof.control import config as server_config
from tapproof.control.joinstring import JoinString, parse
from tapproof.pki import certs
from tapproof.store import open_store
from tests.helpers import free_port
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _intermediates(data_dir: Path) -> dict[str, str]:
    """Fingerprint -> server name of every intermediate in the store."""
    store = open_store(server_config.load(data_dir).db)
    try:
        return {i.fingerprint: i.server for i in store.list_intermediates()}
    finally:
        store.close()


def _roots(data_dir: Path) -> list[str]:
    store = open_store(server_config.load(data_dir).db)
    try:
        return [r.state for r in store.list_trust_roots()]
    finally:
        store.close()


def _join(data_dir: Path, db: str, name: str) -> subprocess.CompletedProcess[str]:
    return procs.tapproof(
        "server", "init", "--data-dir", str(data_dir), "--trust-domain", "example.org", "--db", db,
        "--listen", f"127.0.0.1:{free_port()}", "--name", name, "--join-cluster",
    )  # fmt: skip


def _sign(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return procs.tapproof("server", "ca", "sign-intermediate", "--data-dir", str(data_dir), *extra)


def _token_via(srv: procs.ServerProc, host: str) -> str:
    """A join string made by ``srv`` that enrolls through ``srv`` only."""
    join = str(
        admin.admin_client(srv.data_dir, SystemClock(), server=srv.address).post("/v1/tokens", {"host": host})["join"]
    )
    js = parse(join)
    return JoinString((srv.address,), js.trust_domain, js.fingerprint, js.secret).encode()


def _leaf_intermediate(agent: procs.AgentProc) -> str:
    return certs.fingerprint(x509.load_pem_x509_certificates((agent.data_dir / "cert.pem").read_bytes())[1])


def knows_addresses(agent: procs.AgentProc, peers: set[str]) -> bool:
    """True once the agent's cached registry has a tunnel address for every peer (enrolled is not enough)."""
    try:
        hosts = json.loads((agent.data_dir / "registry.json").read_text())["hosts"]
    except (OSError, ValueError, KeyError):
        return False
    return all(hosts.get(p, {}).get("advertise") for p in peers)


def _concurrent_prepares(data_dir: Path, n: int) -> list[subprocess.CompletedProcess[str]]:
    """``n`` ``server ca rotate prepare`` processes started together."""
    argv = [sys.executable, "-m", "tapproof", "server", "ca", "rotate", "prepare", "--data-dir", str(data_dir)]
    ps = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in ps:
        stdout, stderr = p.communicate(timeout=60)
        out.append(subprocess.CompletedProcess(argv, p.returncode, stdout, stderr))
    return out


def _check_one_prepare_won(data_dir: Path, results: list[subprocess.CompletedProcess[str]]) -> None:
    wins = [r for r in results if r.returncode == 0]
    assert len(wins) == 1, [(r.returncode, r.stderr[-300:]) for r in results]
    for r in results:
        if r.returncode != 0:  # refused for a stated reason: the CAS lost, or the winner was already visible
            assert "won the race" in r.stderr or "already under way" in r.stderr, r.stderr
    assert sorted(_roots(data_dir)) == ["active", "prepared"]
    assert len(list((data_dir / "ca" / "roots").glob("*.key"))) == 1  # the losers removed their keys


@pytest.mark.postgres
def test_servers_join_with_root_online_and_offline_and_agents_cross(pg_url: str, tmp_path: Path) -> None:
    d1, d2, d3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    pool = concurrent.futures.ThreadPoolExecutor(3)  # independent CLI runs overlap (each costs a process start)
    procs.init_server(d1, db=pg_url, extra=("--name", "s1"))

    # s2 joins while the root key is in s1's data dir
    res = _join(d2, pg_url, "s2")
    assert res.returncode == 0, res.stderr
    assert "request is queued" in res.stdout
    assert not (d2 / "ca" / "root.key").exists()
    early = pool.submit(procs.tapproof, "server", "run", "--data-dir", str(d2), timeout=30)
    dup = pool.submit(_join, tmp_path / "dup", pg_url, "s2")
    res = early.result()
    assert res.returncode != 0  # fails closed until its intermediate is signed
    assert "sign-intermediate" in res.stderr, res.stderr
    res = dup.result()
    assert res.returncode != 0  # names are unique in a database, signed or not
    assert "--name" in res.stderr, res.stderr
    res = _sign(d1)
    assert res.returncode == 0, res.stderr
    assert "signed an intermediate for s2" in res.stdout

    # the root key goes offline; s3 joins and needs --root-key
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    shutil.move(d1 / "ca" / "root.key", vault / "root.key")
    joined = pool.submit(_join, d3, pg_url, "s3")
    res = _sign(d1)
    assert res.returncode != 0
    assert "--root-key" in res.stderr, res.stderr
    res = joined.result()
    assert res.returncode == 0, res.stderr
    res = _sign(d1, "--root-key", str(vault / "root.key"))
    assert res.returncode == 0, res.stderr
    assert "signed an intermediate for s3" in res.stdout

    owners = _intermediates(d1)
    assert sorted(owners.values()) == ["s1", "s2", "s3"]  # one intermediate each, all under the one root
    echo = procs.EchoServer()
    servers: list[procs.ServerProc] = []
    agents: list[procs.AgentProc] = []
    try:
        servers = list(pool.map(procs.run_server, (d1, d2, d3)))
        s1, s2, s3 = servers
        svc = ("--service", f"echo=127.0.0.1:{echo.port}")
        argv = {
            "a": (s1, (*svc, "--route", "127.0.0.1:0=echo@b")),
            "b": (s2, (*svc, "--route", "127.0.0.1:0=echo@a")),
            "c": (s3, ("--route", "127.0.0.1:0=echo@a", "--route", "127.0.0.1:0=echo@b")),
        }
        # `token create` (the CLI) on two servers, while the agents start
        joins = [pool.submit(srv.token, "x-" + srv.data_dir.name) for srv in (s1, s2)]
        tokens = {h: _token_via(srv, h) for h, (srv, _args) in argv.items()}
        futs = [pool.submit(procs.start_agent, tmp_path / h, tokens[h], *args) for h, (_srv, args) in argv.items()]
        agents = [f.result() for f in futs]
        a, b, c = agents

        # each agent's leaf chains through the intermediate of the server it enrolled with
        assert [owners.get(_leaf_intermediate(ag)) for ag in agents] == ["s1", "s2", "s3"]
        for ag, peers in ((a, {"b"}), (b, {"a"}), (c, {"a", "b"})):
            procs.wait_for(lambda ag=ag, p=peers: knows_addresses(ag, p), 20, "routes to learn the peers' addresses")
        for ag, index in ((a, 0), (b, 0), (c, 0), (c, 1)):
            sent, got, n = procs.echo_roundtrip(ag.route(index), 64 * 1024, timeout=20)
            assert (got, n) == (sent, 64 * 1024), f"{ag.data_dir.name} route {index}"

        # a join string from any server lists every server
        addresses = {s.address for s in servers}
        for srv, join in zip((s1, s2), joins, strict=True):
            js = parse(join.result())
            assert set(js.servers) == addresses, js.servers
            assert js.servers[0] == srv.address  # its own address first

        # rotate prepare three times at once: one prepared root, every server certified under it
        _check_one_prepare_won(d1, _concurrent_prepares(d1, 3))
        assert sorted(_intermediates(d1).values()) == ["s1", "s1", "s2", "s2", "s3", "s3"]
    finally:
        for ag in agents:
            ag.stop()
        for s in servers:
            s.stop()
        pool.shutdown()
        echo.close()


def test_concurrent_rotate_prepare_on_sqlite(tmp_path: Path) -> None:
    d = tmp_path / "srv"
    procs.init_server(d)
    _check_one_prepare_won(d, _concurrent_prepares(d, 3))
