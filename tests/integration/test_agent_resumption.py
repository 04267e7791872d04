"""Tunnel TLS resumption between two real agents: it happens, keeps the PQ group, and re-checks the peer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import procs

pytestmark = pytest.mark.integration


def _resumed_closes(agent: procs.AgentProc) -> list[dict[str, object]]:
    return [e for e in agent.events("tunnel-closed") if e.get("resumed") is True]


def test_resumed_tunnels_keep_the_pq_group_and_revocation_still_applies(tmp_path: Path) -> None:
    echo = procs.EchoServer()
    srv = procs.start_server(tmp_path / "srv")
    a = b = None
    try:
        b = procs.start_agent(tmp_path / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{echo.port}")
        a = procs.start_agent(tmp_path / "a", srv.token("a"), "--route", "127.0.0.1:0=echo@b")
        procs.wait_for(lambda: "b" in a.status()["registry_hosts"], 15, "a to learn b")
        for _ in range(3):
            sent, received, n = procs.echo_roundtrip(a.route(), 4096)
            assert (sent, n) == (received, 4096)
        assert a.metric("tapproof_agent_handshakes_total", direction="outbound", kind="full") == 1
        assert a.metric("tapproof_agent_handshakes_total", direction="outbound", kind="resumed") == 2
        assert b.metric("tapproof_agent_handshakes_total", direction="inbound", kind="resumed") == 2
        closes = procs.wait_for(lambda: len(_resumed_closes(b)) == 2 and _resumed_closes(b), 10, "b's closed lines")
        assert {e["group"] for e in closes} == {"X25519MLKEM768"}

        # a revoked peer holding a valid ticket: the resumed handshake completes, the peer check refuses it
        srv.admin("revoke", "--host", "a")
        procs.wait_for(lambda: "a" in b.status()["revoked"]["hosts"], 15, "b to learn the revocation")
        before = b.metric("tapproof_agent_handshakes_total", direction="inbound", kind="resumed")
        assert procs.ends_without_data(a.route(), reset_only=True)  # a reset, never data nor a clean EOF
        ev = procs.wait_for(
            lambda: next((e for e in b.events("tunnel-refused") if e.get("reason") == "revoked"), None),
            10,
            "b to refuse the revoked peer",
        )
        assert ev["resumed"] is True
        assert b.metric("tapproof_agent_refusals_total", direction="inbound", reason="revoked") >= 1
        assert b.metric("tapproof_agent_handshakes_total", direction="inbound", kind="resumed") == before
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()
        srv.stop()
        echo.close()
