"""What an agent's sync round costs the control plane: one TLS handshake per round, not one per call.

A round makes four or five calls (policy, revocations, registry, bundle, now and then a
registration or a renewal); inside ``APIClient.session`` they share one keep-alive
connection. Counted on a real server: completed handshakes against the rounds (one
``/v1/policy`` request each).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapproof.agent.renew import client_for, renew
from tapproof.agent.state import AgentPaths
from tapproof.control.client import APIClient
from tapproof.errors import TransportError
from tests.integration import procs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[procs.ServerProc]:
    with procs.server(tmp_path_factory.mktemp("sync-rounds") / "srv") as srv:
        yield srv


def _rounds(srv: procs.ServerProc) -> float:
    return srv.metric("tapproof_server_requests_total", route="^/v1/policy$")


def test_a_round_shares_one_connection(server: procs.ServerProc, tmp_path: Path) -> None:
    a = procs.start_agent(tmp_path / "a", server.token("a"))
    try:
        procs.wait_for(lambda: _rounds(server) >= 2, 20, "the agent's first rounds")
        rounds0 = _rounds(server)
        shakes0 = server.metric("tapproof_server_handshakes_total")
        calls0 = server.metric("tapproof_server_requests_total")
        procs.wait_for(lambda: _rounds(server) >= rounds0 + 5, 30, "five more rounds")
        rounds = _rounds(server) - rounds0
        shakes = server.metric("tapproof_server_handshakes_total") - shakes0
        calls = server.metric("tapproof_server_requests_total") - calls0
        assert calls >= 4 * rounds  # every round still makes its four calls...
        assert shakes <= rounds + 1  # ...over one connection (+1: a round in flight at either reading)
    finally:
        assert a.stop() == 0


def test_a_kept_connection_the_server_dropped_is_replaced(server: procs.ServerProc, tmp_path: Path) -> None:
    """A server restart between two calls of one session: the next call reconnects at once, nothing fails."""
    a = procs.start_agent(tmp_path / "b", server.token("b"))
    assert a.stop() == 0
    paths = AgentPaths(tmp_path / "b")
    client: APIClient = client_for(paths)
    with client.session():
        assert "bundle" in client.get("/v1/bundle")  # the kept connection
        server.kill()
        server.restart()
        probe = client_for(paths)  # another client, outside the session, waits for the new server
        procs.wait_for(lambda: _answers(probe), 20, "the restarted server")
        shakes = server.metric("tapproof_server_handshakes_total")
        assert "hosts" in client.get("/v1/registry")  # the dead kept connection is replaced, first try
        assert "hosts" in client.get("/v1/registry")
        assert server.metric("tapproof_server_handshakes_total") - shakes == 1  # and the new one is kept


def _answers(client: APIClient) -> bool:
    try:
        client.get("/v1/policy")
    except TransportError:
        return False
    return True


def test_a_post_in_a_session_gets_its_own_connection(server: procs.ServerProc, tmp_path: Path) -> None:
    """POST is not idempotent: never sent on the kept connection (whose failure the session repeats)."""
    a = procs.start_agent(tmp_path / "c", server.token("c"))
    assert a.stop() == 0
    paths = AgentPaths(tmp_path / "c")
    client = client_for(paths)
    shakes = server.metric("tapproof_server_handshakes_total")
    with client.session():
        client.get("/v1/policy")  # opens the kept connection
        renew(paths, dt.datetime.now(dt.UTC), client)  # POST /v1/renew: a connection of its own
        client.get("/v1/registry")  # back on the kept connection
        client.call("PUT", "/v1/registration", {"advertise": "127.0.0.1:1", "services": {}, "bundle": []})
    assert server.metric("tapproof_server_handshakes_total") - shakes == 2
