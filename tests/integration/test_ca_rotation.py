"""A full root rotation under steady load: zero failed connections, zero agent restarts.

One server (1-minute leaves), three agents (``b`` fronts an echo service,
``a`` and ``c`` route to it), new tunnels opened continuously (bounded: about
20 per second, at most 1,500 and 80 s). Then ``server ca rotate prepare`` ->
every agent holds both roots -> ``activate`` -> every agent's chain ends at the
new root -> ``retire`` -> every bundle is the new root alone. Every connection
must succeed, every agent keeps its PID, and afterwards a client whose chain
ends at the old root is refused while the same key under the new root is let in.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from tapproof import identity
from tapproof.control import config as server_config
from tapproof.errors import TapproofError
from tapproof.pki import certs, expiry, keys
from tapproof.store import open_store
from tapproof.tls import context
from tapproof.tls.credentials import Credentials, TrustBundle
from tapproof.tls.stream import connect
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Load:
    """New tunnels through ``routes`` at ~``rate``/s until stopped (bounded in count and time)."""

    def __init__(self, routes: list[tuple[str, int]], rate: float = 20.0, limit: int = 1500, seconds: float = 80.0):
        self.routes, self.rate, self.limit, self.seconds = routes, rate, limit, seconds
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        i = 0
        while not self._stop.is_set() and i < self.limit and time.monotonic() < end:
            addr = self.routes[i % len(self.routes)]
            try:
                sent, got, n = procs.echo_roundtrip(addr, 2048, timeout=10)
                if sent != got or n != 2048:
                    self.failures.append(f"#{i} {addr}: echo mismatch ({n} bytes)")
                else:
                    self.ok += 1
            except OSError as exc:
                self.failures.append(f"#{i} {addr}: {exc!r}")
            i += 1
            self._stop.wait(1 / self.rate)

    def stop(self) -> None:
        """Stop and wait for the last connection."""
        self._stop.set()
        self._thread.join(30)


def _chain_root(agent: procs.AgentProc) -> str | None:
    chain = x509.load_pem_x509_certificates((agent.data_dir / "cert.pem").read_bytes())
    bundle = x509.load_pem_x509_certificates((agent.data_dir / "bundle.pem").read_bytes())
    return expiry.chain_root(chain, bundle)


def _rotate(srv: procs.ServerProc, step: str, timeout: float) -> str:
    """Run a rotation step, retrying while it names what blocks it."""
    deadline = time.monotonic() + timeout
    while True:
        res = procs.tapproof("server", "ca", "rotate", step, "--data-dir", str(srv.data_dir))
        if res.returncode == 0:
            return res.stdout
        assert "blocker" in res.stderr, res.stderr  # refused for a reason it states, nothing else
        assert time.monotonic() < deadline, f"rotate {step} still blocked: {res.stderr}"
        time.sleep(1.0)


def _handshake_ok(addr: tuple[str, int], creds: Credentials, bundle: TrustBundle) -> bool:
    """Open a tunnel to echo with ``creds``; True when b answers the CONNECT."""
    try:
        stream = connect(addr, context.client_context(creds, bundle), timeout=5)
    except (TapproofError, OSError):
        return False
    try:
        deadline = time.monotonic() + 5
        stream.sendall(b"CONNECT echo HTTP/1.1\r\nHost: echo\r\n\r\n", deadline)
        return stream.recv(4096, deadline).startswith(b"HTTP/1.1 200")
    except (TapproofError, OSError):
        return False
    finally:
        stream.abort()


def test_root_rotation_under_load(tmp_path: Path) -> None:
    echo = procs.EchoServer()
    srv = procs.start_server(tmp_path / "srv", leaf_ttl="1m")
    agents: list[procs.AgentProc] = []
    load: Load | None = None
    try:
        b = procs.start_agent(tmp_path / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{echo.port}")
        a = procs.start_agent(tmp_path / "a", srv.token("a"), "--route", "127.0.0.1:0=echo@b")
        c = procs.start_agent(tmp_path / "c", srv.token("c"), "--route", "127.0.0.1:0=echo@b")
        agents = [a, b, c]
        pids = [ag.proc.pid for ag in agents]
        for ag in (a, c):
            procs.wait_for(lambda ag=ag: "b" in ag.status()["registry_hosts"], 15, "the route to learn b")
        old = certs.fingerprint(x509.load_pem_x509_certificates((a.data_dir / "bundle.pem").read_bytes())[0])
        load = Load([a.route(), c.route()])
        procs.wait_for(lambda: load.ok >= 20, 15, "the load to run")

        out = _rotate(srv, "prepare", 10)
        new = out.split("prepared root ")[1].split()[0]
        for ag in agents:
            procs.wait_for(lambda ag=ag: len(ag.status()["trust_bundle"]) == 2, 15, "every agent to hold both roots")
        _rotate(srv, "activate", 20)
        for ag in agents:
            procs.wait_for(lambda ag=ag: _chain_root(ag) == new, 30, "every agent's chain under the new root")
        _rotate(srv, "retire", 20)
        for ag in agents:
            procs.wait_for(lambda ag=ag: ag.status()["trust_bundle"] == [new], 15, "every bundle without the old root")
        time.sleep(1.0)  # a few more connections on the final state
        load.stop()

        assert load.ok >= 100, load.ok
        assert load.failures == [], load.failures[:5]
        assert [ag.proc.pid for ag in agents] == pids
        assert all(ag.proc.poll() is None for ag in agents)
        assert all(ag.events("agent-started") and len(ag.events("agent-started")) == 1 for ag in agents)
        st = a.status()
        assert {e["kind"] for e in st["expiries"]} == {"leaf", "intermediate", "root"}
        assert a.metric("tapproof_agent_ca_expiry_seconds", kind="root", cert=new[:16]) > 0

        # after retire: the server's intermediate key, certified under the old root, is refused;
        # the same key and leaf certified under the new root is let in (the check can fail both ways)
        store = open_store(server_config.load(srv.data_dir).db)
        try:
            ints = store.list_intermediates()
        finally:
            store.close()
        int_key = keys.load(srv.data_dir / "ca" / "intermediate.key")
        kid = next(i.key_id for i in ints if i.root == new)
        under = {i.root: certs.load_pem_chain(i.cert_pem.encode())[0] for i in ints if i.key_id == kid}
        assert old in under, "the old-root intermediate of the current key is in the store"
        leaf_key = keys.generate("ecdsa-p256")
        now = dt.datetime.now(dt.UTC)
        sid = identity.host_id("example.org", "a")
        leaf = certs.make_leaf(leaf_key.public_key(), sid, int_key, under[new], now, dt.timedelta(minutes=5))
        trust = TrustBundle(tuple(x509.load_pem_x509_certificates((a.data_dir / "bundle.pem").read_bytes())))
        assert _handshake_ok(b.tunnel, Credentials(leaf_key, (leaf, under[new])), trust)
        assert not _handshake_ok(b.tunnel, Credentials(leaf_key, (leaf, under[old])), trust)
    finally:
        if load is not None:
            load.stop()
        for ag in agents:
            ag.stop()
        srv.stop()
        echo.close()
