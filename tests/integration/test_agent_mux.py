"""Two real agents with ``--mux``: streams multiplexed over pooled agent-pair connections.

``b`` fronts an echo service; ``a`` runs with ``--mux`` and routes to it (and
to a service ``b`` does not front, and to one the policy will deny). Data is
checked with SHA-256 both ways over many concurrent streams; every refusal
resets the application and is logged with the classic reason plus a ``mux``
field; revocation and a killed far agent reset every stream.
"""

from __future__ import annotations

import concurrent.futures
import re
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import procs

pytestmark = pytest.mark.integration

ROUTES = ("echo", "echo2", "nosuch")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[procs.AgentPair]:
    f = procs.AgentPair(tmp_path_factory.mktemp("mux"), ROUTES, ["--mux"])
    try:
        yield f
    finally:
        f.close()


def test_many_concurrent_streams_carry_bytes_intact_both_ways(fleet: procs.AgentPair) -> None:
    sizes = [1, 1000, 70_000, 300_000, 2_000_000] * 8
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda n: procs.echo_roundtrip(fleet.route("echo"), n, timeout=60), sizes))
    for (sent, received, n), size in zip(results, sizes, strict=True):
        assert n == size
        assert sent == received
    # they went over at most two mux connections, never one TLS connection each
    assert 1 <= fleet.a.metric("tapproof_agent_mux_connections", direction="outbound") <= 2
    assert fleet.a.metric("tapproof_agent_mux_streams_total", direction="outbound", result="opened") >= len(sizes)
    assert fleet.b.metric("tapproof_agent_mux_streams_total", direction="inbound", result="opened") >= len(sizes)

    # b logs a stream's end just after the last byte leaves it: wait for the last lines
    def all_closed() -> list[dict[str, object]] | None:
        lines = [e for e in fleet.b.events("tunnel-closed") if e.get("mux")]
        return lines if len(lines) >= len(sizes) else None

    closed = procs.wait_for(all_closed, 15, "b's tunnel-closed lines for every stream")
    assert all(e["end"] == "clean" for e in closed[-len(sizes) :])
    assert all(e["group"] == "X25519MLKEM768" for e in fleet.a.events("mux-opened"))
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", e["address"]) for e in fleet.a.events("mux-opened"))  # host:port


def test_half_close_keeps_the_other_direction_open(fleet: procs.AgentPair) -> None:
    with socket.create_connection(fleet.route("echo"), timeout=15) as s:
        s.sendall(b"x" * 100_000)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
    assert bytes(got) == b"x" * 100_000


def test_refused_open_resets_the_application(fleet: procs.AgentPair) -> None:
    assert procs.ends_without_data(fleet.route("nosuch"), reset_only=True)
    ev = procs.refused(fleet.b, "unknown-service")
    assert ev["status"] == 502
    assert ev["mux"]
    assert procs.refused(fleet.a, "remote-unavailable")["mux"]


def test_policy_denies_one_stream_and_not_the_others(fleet: procs.AgentPair) -> None:
    out = fleet.srv.admin("policy", "deny", "--from", "host/a", "--to", "echo2")
    rule = out.split()[1]
    try:
        procs.wait_for(lambda: fleet.b.status()["policy"]["rules"] >= 1, 10, "b to learn the deny rule")
        with socket.create_connection(fleet.route("echo"), timeout=15) as live:
            live.sendall(b"ping")
            assert live.recv(4) == b"ping"
            assert procs.ends_without_data(fleet.route("echo2"), reset_only=True)
            ev = procs.refused(fleet.b, "policy-denied")
            assert ev["peer"] == "spiffe://example.org/host/a"
            assert ev["status"] == 403
            procs.refused(fleet.a, "remote-forbidden")
            live.sendall(b"pong")  # the stream on the same connection is not affected
            assert live.recv(4) == b"pong"
    finally:
        fleet.srv.admin("policy", "remove", rule)


def test_idle_streams_are_held_cheaply(fleet: procs.AgentPair) -> None:
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * n + 256)), hard))

    def rss(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    socks: list[socket.socket] = []
    try:
        for _ in range(20):  # warm-up: connections, threads, code paths
            s = socket.create_connection(fleet.route("echo"), timeout=15)
            s.sendall(b"w")
            assert s.recv(1) == b"w"
            socks.append(s)
        time.sleep(0.5)
        base = (rss(fleet.a.proc.pid), rss(fleet.b.proc.pid))
        for _ in range(n):
            s = socket.create_connection(fleet.route("echo"), timeout=15)
            socks.append(s)
        for s in socks[20:]:
            s.sendall(b"i")
        for s in socks[20:]:
            assert s.recv(1) == b"i"
        time.sleep(0.5)
        per = [(rss(p) - b) / n for p, b in zip((fleet.a.proc.pid, fleet.b.proc.pid), base, strict=True)]
        print(f"\nRSS per idle mux stream at {n}: client agent {per[0]:.1f} KiB, server agent {per[1]:.1f} KiB")
        assert fleet.b.metric("tapproof_agent_mux_streams_active", direction="inbound") >= n
    finally:
        for s in socks:
            s.close()
    procs.wait_for(
        lambda: fleet.b.metric("tapproof_agent_mux_streams_active", direction="inbound") == 0, 30, "streams to end"
    )


def test_revocation_closes_the_mux_connections_and_their_streams(fleet: procs.AgentPair) -> None:
    r = procs.start_agent(fleet.tmp / "r", fleet.srv.token("r"), "--mux", "--route", "127.0.0.1:0=echo@b")
    try:
        procs.wait_for(lambda: "b" in r.status()["registry_hosts"], 15, "r to learn b")
        lives = [socket.create_connection(r.route(), timeout=10) for _ in range(3)]
        for live in lives:
            live.sendall(b"ping")
            assert live.recv(4) == b"ping"
        assert r.metric("tapproof_agent_mux_connections", direction="outbound") >= 1
        fleet.srv.admin("revoke", "--host", "r")
        for live in lives:
            live.settimeout(15)
            with pytest.raises(ConnectionResetError):
                live.recv(10)
            live.close()
        procs.wait_for(
            lambda: (
                fleet.b.metric("tapproof_agent_mux_connections", direction="inbound") == 0
                or all(e.get("peer") != "spiffe://example.org/host/r" for e in _open_muxes(fleet.b))
            ),
            10,
            "b to close r's mux connection",
        )
        assert procs.ends_without_data(r.route(), reset_only=True)  # and a new one is refused
    finally:
        r.stop()


def _open_muxes(agent: procs.AgentProc) -> list[dict[str, object]]:
    opened = {e["mux"]: e for e in agent.events("mux-opened")}
    for e in agent.events("mux-closed"):
        opened.pop(e["mux"], None)
    return list(opened.values())


def test_killing_the_far_agent_resets_every_stream(fleet: procs.AgentPair) -> None:
    lives = [socket.create_connection(fleet.route("echo"), timeout=10) for _ in range(5)]
    for live in lives:
        live.sendall(b"ping")
        assert live.recv(4) == b"ping"
    fleet.b.proc.kill()
    fleet.b.proc.wait(10)
    try:
        for live in lives:
            live.settimeout(15)
            with pytest.raises(ConnectionResetError):
                live.recv(10)
            live.close()
    finally:
        fleet.b = fleet.start_b(join=False)  # the module's teardown stops it
