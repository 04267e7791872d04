"""TLS 1.3 resumption for tunnels: psk_dhe_ke with X25519MLKEM768, bound to one credential generation."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib

from tapproof.errors import PeerReason, PeerRejected, TapproofError
from tapproof.pki.verify import check_leaf
from tapproof.tls import context
from tapproof.tls.credentials import TrustBundle
from tapproof.tls.sessions import SessionStore, was_resumed
from tapproof.tls.stream import TLSStream
from tests.pkifix import host_creds, make_ca

PEER = ("server", ("127.0.0.1", 7444))


@dataclasses.dataclass
class Outcome:
    """What each side saw."""

    server_resumed: bool | None
    server_group: str
    server_peer: str
    client_resumed: bool


def _connect(server_ctx: SSL.Context, client_ctx: SSL.Context, store: SessionStore, gen: object) -> Outcome:
    """One real handshake over a socket pair; the client offers what ``store`` holds and saves the new ticket."""
    a, b = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        s = TLSStream.server(server_ctx, a)
        try:
            s.handshake(time.monotonic() + 5)
            leaf = s.conn.get_peer_certificate(as_cryptography=True)
            assert leaf is not None
            seen["peer"] = str(check_leaf(leaf, trust_domain="example.org", now=_now(), usage="client"))
            seen["resumed"], seen["group"] = was_resumed(s.conn), s.group
            s.sendall(b"ok", time.monotonic() + 5)
        except TapproofError as exc:
            seen["error"] = exc
        finally:
            s.abort()  # an abrupt end, as most tunnels have: must not spoil the stored copy

    t = threading.Thread(target=serve)
    t.start()
    c = TLSStream.client(client_ctx, b)
    try:
        store.offer(c.conn, gen, PEER)
        c.handshake(time.monotonic() + 5)
        assert c.recv(10, time.monotonic() + 5) == b"ok"
        store.save(c.conn, gen, PEER)
        client_resumed = was_resumed(c.conn)
    finally:
        c.abort()
        t.join(10)
    if "error" in seen:
        raise seen["error"]  # type: ignore[misc]
    return Outcome(
        seen["resumed"],  # type: ignore[arg-type]
        str(seen["group"]),
        str(seen["peer"]),
        client_resumed,
    )


def _now():  # type: ignore[no-untyped-def]
    import datetime as dt

    return dt.datetime.now(dt.UTC)


@pytest.fixture
def pki(tmp_path: Path):  # type: ignore[no-untyped-def]
    ca = make_ca(tmp_path / "ca")
    return ca, host_creds(ca, "server"), host_creds(ca, "client")


def _ctxs(ca, srv, cli, bundle: TrustBundle | None = None) -> tuple[SSL.Context, SSL.Context]:  # type: ignore[no-untyped-def]
    b = bundle or ca.bundle
    return (
        context.server_context(srv, b, resumption=True),
        context.client_context(cli, b, resumption=True),
    )


def test_second_connection_resumes_with_the_pq_group_and_the_peer_leaf(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, cli = pki
    sctx, cctx = _ctxs(ca, srv, cli)
    store = SessionStore()
    first = _connect(sctx, cctx, store, "gen1")
    assert (first.server_resumed, first.client_resumed) == (False, False)
    for _ in range(3):  # each resumption brings a fresh ticket; the aborted connections do not spoil them
        again = _connect(sctx, cctx, store, "gen1")
        assert (again.server_resumed, again.client_resumed) == (True, True)
        assert again.server_group == "X25519MLKEM768"  # psk_dhe_ke: a fresh hybrid key exchange
        assert again.server_peer == "spiffe://example.org/host/client"  # the leaf is there to re-check


def test_psk_ke_is_never_enabled(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, cli = pki
    for ctx in _ctxs(ca, srv, cli):
        assert not lib.SSL_CTX_get_options(ctx._context) & context._OP_ALLOW_NO_DHE_KEX


_OP_PREFER_NO_DHE_KEX = 1 << 35  # SSL_OP_PREFER_NO_DHE_KEX (OpenSSL >= 3.3): a server that would pick psk_ke


def test_a_psk_ke_resumption_is_refused_as_not_pq(pki) -> None:  # type: ignore[no-untyped-def]
    """Were psk_ke ever negotiated (both sides allowing it), no key was exchanged: require_pq fails closed.

    (OpenSSL then reports the first session's group, so a group check alone would pass it.)
    """
    ca, srv, cli = pki
    sctx, cctx = _ctxs(ca, srv, cli)
    for ctx in (sctx, cctx):
        ctx.set_options(context._OP_ALLOW_NO_DHE_KEX | _OP_PREFER_NO_DHE_KEX)
    store = SessionStore()
    first = _connect(sctx, cctx, store, "gen1")  # a full handshake still runs the hybrid exchange
    assert first.server_group == "X25519MLKEM768"
    with pytest.raises(PeerRejected) as info:
        _connect(sctx, cctx, store, "gen1")
    assert info.value.reason is PeerReason.NOT_PQ


def test_renewed_server_certificate_forces_a_full_handshake(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, cli = pki
    sctx, cctx = _ctxs(ca, srv, cli)
    store = SessionStore()
    _connect(sctx, cctx, store, "gen1")
    renewed, _ = _ctxs(ca, host_creds(ca, "server"), cli)
    out = _connect(renewed, cctx, store, "gen1")
    assert (out.server_resumed, out.client_resumed) == (False, False)


def test_same_credentials_new_context_does_not_resume(pki) -> None:  # type: ignore[no-untyped-def]
    """A restarted agent (new ticket key) cannot be resumed against."""
    ca, srv, cli = pki
    sctx, cctx = _ctxs(ca, srv, cli)
    store = SessionStore()
    _connect(sctx, cctx, store, "gen1")
    out = _connect(_ctxs(ca, srv, cli)[0], cctx, store, "gen1")
    assert out.server_resumed is False


def test_server_bundle_change_refuses_old_tickets(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, srv, cli = pki
    other = make_ca(tmp_path / "other")
    sctx, cctx = _ctxs(ca, srv, cli)
    store = SessionStore()
    _connect(sctx, cctx, store, "gen1")
    assert context.generation_id(srv, ca.bundle) != context.generation_id(
        srv, TrustBundle(ca.bundle.roots + other.bundle.roots)
    )
    widened = context.server_context(srv, TrustBundle(ca.bundle.roots + other.bundle.roots), resumption=True)
    out = _connect(widened, cctx, store, "gen1")
    assert out.server_resumed is False


def test_client_generation_change_empties_the_store(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, cli = pki
    sctx, cctx = _ctxs(ca, srv, cli)
    store = SessionStore()
    _connect(sctx, cctx, store, "gen1")
    assert len(store) == 1
    out = _connect(sctx, cctx, store, "gen2")
    assert out.client_resumed is False
    assert _connect(sctx, cctx, store, "gen2").client_resumed is True


def test_expired_entries_are_not_offered(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, cli = pki
    sctx, cctx = _ctxs(ca, srv, cli)
    now = [1000.0]
    store = SessionStore(lifetime=60, clock=lambda: now[0])
    _connect(sctx, cctx, store, "g")
    now[0] += 61
    assert _connect(sctx, cctx, store, "g").client_resumed is False


def test_resumption_still_requires_the_pq_group(pki) -> None:  # type: ignore[no-untyped-def]
    """A client holding a valid ticket but offering only classical X25519 gets no handshake."""
    ca, srv, cli = pki
    sctx, cctx = _ctxs(ca, srv, cli)
    store = SessionStore()
    _connect(sctx, cctx, store, "g")
    classical = context.client_context(cli, ca.bundle, resumption=True)
    assert lib.SSL_CTX_set1_curves_list(classical._context, b"X25519") == 1
    with pytest.raises(PeerRejected):
        _connect(sctx, classical, store, "g")


def test_resumption_needs_mutual_auth(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, _cli = pki
    with pytest.raises(TapproofError):
        context.server_context(srv, ca.bundle, require_client_cert=False, resumption=True)
