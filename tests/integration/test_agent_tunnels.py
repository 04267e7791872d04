"""Two real agents and a real control plane on loopback: data through routes, and every refusal.

One server and two agents per module: ``b`` fronts an echo service (as ``echo``
and ``echo2``) and a real ``redis-server``; ``a`` has routes to them and to a
service ``b`` does not front. Each refusal test checks the log line and the
metric on the agent that refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from tapproof.agent.state import AgentPaths, load_bundle, load_credentials
from tapproof.errors import PeerRejected, TransportError
from tapproof.identity import host_id
from tapproof.pki import keys
from tapproof.pki.ca import load_ca
from tapproof.tls import context
from tapproof.tls.credentials import Credentials, TrustBundle
from tapproof.tls.stream import connect
from tests.helpers import free_port, require_tool
from tests.integration import procs

pytestmark = pytest.mark.integration

ROUTES = ("echo", "echo2", "nosuch", "redis")


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server on loopback, started before the agents (b fronts it as ``redis``); 0 without redis."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        yield 0  # the redis test skips on require_tool
        return
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path_factory.mktemp("redis"),
    )
    try:
        ping = ["redis-cli", "-p", str(port), "ping"]
        procs.wait_for(lambda: subprocess.run(ping, capture_output=True).returncode == 0, 30, "redis-server")
        yield port
    finally:
        redis.terminate()
        redis.wait(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[procs.AgentPair]:
    service = f"redis=127.0.0.1:{redis_port or free_port()}"
    f = procs.AgentPair(tmp_path_factory.mktemp("fleet"), ROUTES, b_services=[service])
    try:
        yield f
    finally:
        f.close()


# --- data ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_route_carries_64mib_each_way_intact(fleet: procs.AgentPair) -> None:
    sent, received, n = procs.echo_roundtrip(fleet.route("echo"), 64 << 20)
    assert n == 64 << 20
    assert sent == received
    ev = procs.wait_for(
        lambda: [e for e in fleet.b.events("tunnel-closed") if e.get("bytes_to_peer") == 64 << 20],
        10,
        "b's tunnel-closed line",
    )[-1]
    assert ev["group"] == "X25519MLKEM768"
    assert ev["peer"] == "spiffe://example.org/host/a"
    assert ev["service"] == "echo"
    assert ev["end"] == "clean"
    assert ev["bytes_from_peer"] == 64 << 20


def test_half_close_keeps_the_other_direction_open(fleet: procs.AgentPair) -> None:
    with socket.create_connection(fleet.route("echo"), timeout=10) as s:
        s.sendall(b"first part, ")
        time.sleep(0.2)
        s.sendall(b"then EOF")
        s.shutdown(socket.SHUT_WR)  # our direction ends; the echo must still come back, then EOF
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    assert got == b"first part, then EOF"


def test_status_and_health(fleet: procs.AgentPair) -> None:
    code, body = fleet.b.admin_get("/healthz")
    assert code == 200, body
    st = fleet.b.status()
    assert st["spiffe_id"] == "spiffe://example.org/host/b"
    assert set(st["services"]) == {"echo", "echo2", "redis"}
    procs.wait_for(lambda: fleet.b.status()["control_plane"]["up"] is True, 20, "b's control plane up")
    assert st["policy"]["version"]
    assert fleet.a.status()["routes"]
    procs.wait_for(lambda: fleet.a.metric("tapproof_agent_control_plane_up") == 1, 20, "a's control_plane_up")
    assert fleet.a.metric("tapproof_agent_certificate_expiry_seconds") > 60


@pytest.mark.slow
def test_redis_benchmark_and_cli_through_the_tunnel(fleet: procs.AgentPair, redis_port: int) -> None:
    require_tool("redis-server", "redis-benchmark", "redis-cli")
    direct = ["redis-cli", "-p", str(redis_port)]
    host, port = fleet.route("redis")
    via = ["redis-cli", "-h", host, "-p", str(port)]
    assert subprocess.run([*via, "set", "canary", "tapproof"], capture_output=True, text=True).stdout == "OK\n"
    out = subprocess.run([*direct, "get", "canary"], capture_output=True, text=True, timeout=10).stdout
    assert out == "tapproof\n"
    bench = subprocess.run(
        ["redis-benchmark", "-h", host, "-p", str(port), "-n", "20000", "-q", "-t", "set,get"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bench.returncode == 0, bench.stderr
    lines = [ln for ln in bench.stdout.replace("\r", "\n").splitlines() if "requests per second" in ln]
    assert len(lines) == 2, bench.stdout
    assert "error" not in (bench.stdout + bench.stderr).lower()


# --- refusals --------------------------------------------------------------------------------
def test_garbage_on_the_tunnel_port_is_refused(fleet: procs.AgentPair) -> None:
    with socket.create_connection(fleet.b.tunnel, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
    ev = procs.refused(fleet.b, "not-tls")
    assert ev["direction"] == "inbound"


def _tls_attempt(addr: tuple[str, int], ctx: SSL.Context) -> Exception | None:
    """Connect with ``ctx`` and read: the error that ended it (TLS 1.3 clients learn of a refusal on read)."""
    try:
        stream = connect(addr, ctx, timeout=10)
    except (PeerRejected, TransportError) as exc:
        return exc
    try:
        stream.recv(1, time.monotonic() + 5)
    except (PeerRejected, TransportError) as exc:
        return exc
    finally:
        stream.abort()
    return None


def test_certificate_from_another_ca_is_refused(fleet: procs.AgentPair) -> None:
    other = fleet.tmp / "other-srv"
    with procs.server(other, td="example.org") as srv2:
        c_dir = fleet.tmp / "c"
        res = procs.tapproof("agent", "enroll", "--data-dir", str(c_dir), "--join", srv2.token("c"))
        assert res.returncode == 0, res.stderr
    c = AgentPaths(c_dir)
    # Trust both roots so that OUR side accepts b: only b's verdict on our certificate is tested.
    roots = TrustBundle((*load_bundle(c).roots, *load_bundle(AgentPaths(fleet.a.data_dir)).roots))
    assert _tls_attempt(fleet.b.tunnel, context.client_context(load_credentials(c), roots))
    procs.refused(fleet.b, "untrusted")


def test_expired_certificate_is_refused(fleet: procs.AgentPair) -> None:
    ca = load_ca(fleet.srv.data_dir, "example.org")
    key = keys.generate("ecdsa-p256")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)
    creds = Credentials(key, ca.issue(key.public_key(), host_id("example.org", "a"), past, dt.timedelta(minutes=1)))
    bundle = load_bundle(AgentPaths(fleet.a.data_dir))
    assert _tls_attempt(fleet.b.tunnel, context.client_context(creds, bundle))
    procs.refused(fleet.b, "expired")


def test_policy_deny_closes_the_application_connection(fleet: procs.AgentPair) -> None:
    out = fleet.srv.admin("policy", "deny", "--from", "host/a", "--to", "echo2")
    rule = out.split()[1]
    try:
        procs.wait_for(lambda: fleet.b.status()["policy"]["rules"] >= 1, 10, "b to learn the deny rule")
        assert procs.ends_without_data(fleet.route("echo2"))
        ev = procs.refused(fleet.b, "policy-denied")
        assert ev["peer"] == "spiffe://example.org/host/a"
        assert ev["status"] == 403
        procs.refused(fleet.a, "remote-forbidden")
        # the other service is not affected
        sent, received, _ = procs.echo_roundtrip(fleet.route("echo"), 1 << 16)
        assert sent == received
    finally:
        fleet.srv.admin("policy", "remove", rule)


def test_unknown_service_gets_502(fleet: procs.AgentPair) -> None:
    assert procs.ends_without_data(fleet.route("nosuch"))
    ev = procs.refused(fleet.b, "unknown-service")
    assert ev["status"] == 502
    procs.refused(fleet.a, "remote-unavailable")


def test_revoked_peer_is_cut_off_and_refused(fleet: procs.AgentPair) -> None:
    r = procs.start_agent(fleet.tmp / "r", fleet.srv.token("r"), "--route", "127.0.0.1:0=echo@b")
    try:
        procs.wait_for(lambda: "b" in r.status()["registry_hosts"], 15, "r to learn b")
        live = socket.create_connection(r.route(), timeout=10)
        live.sendall(b"ping")
        assert live.recv(4) == b"ping"
        procs.wait_for(lambda: "r" in fleet.b.status()["peers"], 10, "b to see the tunnel from r")
        fleet.srv.admin("revoke", "--host", "r")
        t0 = time.monotonic()
        live.settimeout(15)
        try:
            gone = live.recv(10) == b""
        except ConnectionResetError:
            gone = True
        cut_after = time.monotonic() - t0
        live.close()
        assert gone
        assert cut_after < 10, f"live tunnel of a revoked peer survived {cut_after:.1f}s"
        # a new tunnel from r is refused by b (r's serial and host are revoked)
        assert procs.ends_without_data(r.route())
        procs.wait_for(  # b logs the refusal just after r sees the close
            lambda: "revoked" in {e.get("reason") for e in fleet.b.events("tunnel-refused")}, 10, "b to log revoked"
        )
        assert fleet.b.metric("tapproof_agent_refusals_total", direction="inbound", reason="revoked") >= 1
        closed = [e for e in fleet.b.events("revocations-updated") if e.get("tunnels_closed")]
        assert closed
    finally:
        r.stop()


# --- signals -------------------------------------------------------------------------------
def test_sighup_reload_adds_a_route_and_keeps_config_on_error(fleet: procs.AgentPair) -> None:
    cfg = fleet.tmp / "h.toml"
    cfg.write_text('route = ["127.0.0.1:0=echo@b"]\n')
    h = procs.start_agent(fleet.tmp / "h", fleet.srv.token("h"), "--config", str(cfg))
    try:
        assert len(h.addresses["route_list"]) == 1
        cfg.write_text('route = ["127.0.0.1:0=echo@b", "127.0.0.1:0=echo2@b"]\n')
        h.signal(signal.SIGHUP)
        procs.wait_for(lambda: len(h.status()["routes"]) == 2, 10, "the reload to add a route")
        cfg.write_text('route = ["not a route"]\n')
        h.signal(signal.SIGHUP)
        procs.wait_for(lambda: h.events("config-reload-failed"), 10, "the failed reload to be logged")
        assert len(h.status()["routes"]) == 2
    finally:
        assert h.stop() == 0


def test_sigterm_drains_live_tunnels(fleet: procs.AgentPair) -> None:
    d = procs.start_agent(
        fleet.tmp / "d", fleet.srv.token("d"), "--route", "127.0.0.1:0=echo@b", "--drain-timeout", "3s"
    )
    try:
        procs.wait_for(lambda: "b" in d.status()["registry_hosts"], 15, "d to learn b")
        with socket.create_connection(d.route(), timeout=10) as s:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            time.sleep(0.5)
            s.sendall(b"still here")  # draining: the live tunnel still works
            assert s.recv(100) == b"still here"
            assert d.proc.wait(15) == 0
            assert 2.5 < time.monotonic() - t0 < 12
        stopped = d.events("agent-stopped")[-1]
        assert stopped["aborted"] == 1
    finally:
        d.stop()  # no-op when it already exited


def test_no_listener_is_reachable_before_enrollment(tmp_path: Path) -> None:
    res = procs.tapproof("agent", "run", "--data-dir", str(tmp_path / "x"), "--listen-tunnel", "127.0.0.1:0")
    assert res.returncode == 2
    assert "--join" in res.stderr
