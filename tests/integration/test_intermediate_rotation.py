"""A real automatic intermediate rotation at half-life, root key online and offline, under load.

Two independent servers (SQLite) with 1-minute intermediates, started together:

* ``on`` keeps the root key in its data dir. Two agents (``b`` fronts an echo
  service, ``a`` routes to it; 1-minute leaves renewed at a fifth of their
  life) carry new tunnels continuously (bounded: ~20/s, at most 1,500, 70 s).
  At half the intermediate's life the server certifies a new intermediate key
  by itself, without a restart; both agents' next leaves chain to it; not one
  connection fails and no process restarts.
* ``off`` has its root key moved out before it runs. At half-life it queues a
  request and warns: log line ``intermediate-rotation-pending``, the request
  in ``server status``, ``tapproof_server_ca_rotation_pending`` = 1. Then
  ``server ca sign-intermediate --root-key FILE`` signs it and the running
  server switches to the new intermediate within seconds (metric back to 0).

``b`` also runs with ``--expiry-warn 25%,root=20000d``: its root is flagged
in ``/status`` and the warning metric, ``a``'s (default 25%) is not.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tapproof.clock import SystemClock
from tapproof.control import admin
from tapproof.control import config as server_config
from tapproof.pki import certs
from tapproof.store import open_store
from tests.integration import procs
from tests.integration.test_ca_rotation import Load
from tests.integration.test_cluster_join import knows_addresses

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TTL = ("--intermediate-ttl", "1m")


def _server_metric(srv: procs.ServerProc, name: str) -> float | None:
    """One unlabelled sample from the server's Prometheus endpoint (None: absent)."""
    with urllib.request.urlopen(f"http://{srv.metrics}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def _agent_intermediate(agent: procs.AgentProc) -> str:
    """Fingerprint of the intermediate the agent's current leaf chains through."""
    chain = x509.load_pem_x509_certificates((agent.data_dir / "cert.pem").read_bytes())
    return certs.fingerprint(chain[1])


def _intermediates(srv: procs.ServerProc, server: str) -> list[str]:
    """Fingerprints of ``server``'s intermediates in the store, oldest first."""
    store = open_store(server_config.load(srv.data_dir).db)
    try:
        return [i.fingerprint for i in store.list_intermediates(server)]
    finally:
        store.close()


def _events(srv: procs.ServerProc, name: str) -> list[dict[str, object]]:
    return [e for e in procs.read_events(srv.log_path) if e.get("event") == name]


def _status_then_sign(srv: procs.ServerProc, root_key: Path) -> tuple[str, int, subprocess.CompletedProcess[str]]:
    """``server status`` (stdout), the number of intermediates, then ``server ca sign-intermediate --root-key``."""
    status = srv.admin("status")
    before = len(_intermediates(srv, "off"))
    res = procs.tapproof(
        "server", "ca", "sign-intermediate", "--data-dir", str(srv.data_dir), "--root-key", str(root_key)
    )
    return status, before, res


def _token(srv: procs.ServerProc, host: str) -> str:
    """A join string through the admin API in this process (a CLI run costs seconds on a loaded machine)."""
    return str(admin.admin_client(srv.data_dir, SystemClock()).post("/v1/tokens", {"host": host})["join"])


def test_intermediate_rotates_at_half_life_online_and_waits_for_an_offline_root(tmp_path: Path) -> None:
    echo = procs.EchoServer()
    pool = concurrent.futures.ThreadPoolExecutor(2)  # CLI runs overlap: each costs seconds on a loaded machine
    inits = [
        pool.submit(procs.init_server, tmp_path / "off", extra=(*TTL, "--name", "off")),
        pool.submit(procs.init_server, tmp_path / "on", leaf_ttl="1m", extra=(*TTL, "--name", "on")),
    ]
    for f in inits:
        f.result()
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    shutil.move(tmp_path / "off" / "ca" / "root.key", vault / "root.key")
    servers, agents = [procs.run_server(tmp_path / "off")], []
    off = servers[0]
    load: Load | None = None
    try:
        on = procs.run_server(tmp_path / "on")
        servers.append(on)
        renew = ("--renew-fraction", "0.2")
        argv = {
            "b": ("--service", f"echo=127.0.0.1:{echo.port}", *renew, "--expiry-warn", "25%,root=20000d"),
            "a": ("--route", "127.0.0.1:0=echo@b", *renew),
        }
        tokens = {h: _token(on, h) for h in argv}
        futs = {h: pool.submit(procs.start_agent, tmp_path / h, tokens[h], *args) for h, args in argv.items()}
        started = {h: f.result() for h, f in futs.items()}
        a, b = started["a"], started["b"]
        agents = [a, b]
        pids = [p.proc.pid for p in (*servers, *agents)]
        procs.wait_for(lambda: knows_addresses(a, {"b"}), 15, "the route to learn b's address")
        # the rotation watched is the first one after the load started (on a slow machine the setup may
        # outlast the first half-life: then it is the next one, 30 s later)
        rotations = len(_events(on, "intermediate-rotated"))
        before = {_agent_intermediate(a), _agent_intermediate(b)}
        load = Load([a.route()], seconds=80)
        procs.wait_for(lambda: load.ok >= 20, 15, "the load to run")

        # offline root (checked below): once it warns, `server status` then the signature, in the background
        procs.wait_for(lambda: _events(off, "intermediate-rotation-pending"), 45, "the offline-root warning")
        # the line is logged just before the gauge is set: wait for the gauge too (checked below)
        pending_metric = procs.wait_for(
            lambda: _server_metric(off, "tapproof_server_ca_rotation_pending") or None, 10, "the rotation-pending gauge"
        )
        signed = pool.submit(_status_then_sign, off, vault / "root.key")

        # --- root key online: rotated by the server itself, new leaves chain to the new one ---------
        procs.wait_for(lambda: len(_events(on, "intermediate-rotated")) > rotations, 45, "the online rotation")
        assert [f for f in _intermediates(on, "on") if f not in before], "the rotation recorded a new intermediate"
        for ag in agents:
            procs.wait_for(
                lambda ag=ag: (
                    _agent_intermediate(ag) not in before and _agent_intermediate(ag) in _intermediates(on, "on")
                ),
                30,
                "leaves under the new intermediate",
            )
        ok_switched = load.ok
        procs.wait_for(lambda: load.ok >= ok_switched + 10, 15, "connections on the new chains")
        load.stop()
        assert load.failures == [], load.failures[:5]
        assert [p.proc.pid for p in (*servers, *agents)] == pids
        assert all(p.proc.poll() is None for p in (*servers, *agents))
        assert len(a.events("agent-started")) == len(b.events("agent-started")) == 1

        # --- the agent's --expiry-warn ---------------------------------------------------------------
        fp16 = certs.fingerprint(x509.load_pem_x509_certificates((a.data_dir / "bundle.pem").read_bytes())[0])[:16]
        st_a, st_b = a.status(), b.status()
        assert (st_a["expiry_warn"], st_b["expiry_warn"]) == ("25%", "25%,root=20000d")
        root_warn = {
            n: next(e["warn"] for e in st["expiries"] if e["kind"] == "root") for n, st in (("a", st_a), ("b", st_b))
        }
        assert root_warn == {"a": False, "b": True}
        assert b.metric("tapproof_agent_ca_expiry_warning", kind="root", cert=fp16) == 1
        assert a.metric("tapproof_agent_ca_expiry_warning", kind="root", cert=fp16) == 0

        # --- offline root: the server queues a request and warns in three places -------------------
        assert pending_metric == 1
        status, before, res = signed.result(timeout=60)
        assert "intermediate requests waiting for the root key: off" in status, status
        assert before == 1  # nothing signed without the root key
        assert res.returncode == 0, res.stderr
        assert "signed an intermediate for off" in res.stdout, res.stdout
        procs.wait_for(lambda: _server_metric(off, "tapproof_server_ca_rotation_pending") == 0, 15, "the pickup")
        assert any(e.get("reason") == "chain" for e in _events(off, "ca-reloaded"))
        assert len(_intermediates(off, "off")) == 2
        assert off.proc.poll() is None
    finally:
        if load is not None:
            load.stop()
        for ag in agents:
            ag.stop()
        for s in servers:
            s.stop()
        pool.shutdown()
        echo.close()
