"""TLS contexts over real socket pairs: only mutual TLS 1.3 with X25519MLKEM768 gets through."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib

from tapproof.errors import HandshakeTimeout, PeerReason, PeerRejected, TapproofError
from tapproof.tls import context
from tapproof.tls.stream import TLSStream
from tests.pkifix import host_creds, make_ca


def _pair(server_ctx: SSL.Context, client: Callable[[socket.socket], object]) -> tuple[object, object]:
    a, b = socket.socketpair()
    result: dict[str, object] = {}

    def serve() -> None:
        s = TLSStream.server(server_ctx, a)
        try:
            s.handshake(time.monotonic() + 5)
            result["server"] = s.group
            s.sendall(b"ok", time.monotonic() + 5)
        except TapproofError as exc:
            result["server"] = exc
        finally:
            s.abort()

    t = threading.Thread(target=serve)
    t.start()
    try:
        result["client"] = client(b)
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever the client raised
        result["client"] = exc
    finally:
        b.close()
    t.join(10)
    return result["server"], result["client"]


@pytest.fixture
def pki(tmp_path: Path):  # type: ignore[no-untyped-def]
    ca = make_ca(tmp_path / "ca")
    return ca, host_creds(ca, "server"), host_creds(ca, "client")


def test_mutual_pq_handshake(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, cli = pki

    def client(sock: socket.socket) -> object:
        s = TLSStream.client(context.client_context(cli, ca.bundle), sock)
        s.handshake(time.monotonic() + 5)
        assert s.recv(10, time.monotonic() + 5) == b"ok"
        return s.group

    server, client_group = _pair(context.server_context(srv, ca.bundle), client)
    assert server == "X25519MLKEM768"
    assert client_group == "X25519MLKEM768"


def test_classical_only_client_refused(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, cli = pki

    def client(sock: socket.socket) -> object:
        ctx = context.client_context(cli, ca.bundle)
        assert lib.SSL_CTX_set1_curves_list(ctx._context, b"X25519:P-256") == 1
        s = TLSStream.client(ctx, sock)
        s.handshake(time.monotonic() + 5)
        return s.group

    server, client_res = _pair(context.server_context(srv, ca.bundle), client)
    assert isinstance(server, PeerRejected)
    assert server.reason is PeerReason.HANDSHAKE_FAILED
    assert isinstance(client_res, PeerRejected)
    assert "key share" in server.detail  # refused for the group, not for something else


def test_tls12_client_refused(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, _ = pki

    def client(sock: socket.socket) -> object:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=ca.bundle.to_pem().decode())
        ctx.check_hostname = False
        with ctx.wrap_socket(sock) as s:
            return s.version()

    server, client_res = _pair(context.server_context(srv, ca.bundle), client)
    assert isinstance(server, PeerRejected)
    assert "unsupported protocol" in server.detail
    assert isinstance(client_res, ssl.SSLError)


def test_missing_client_certificate_refused(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, _ = pki

    def client(sock: socket.socket) -> object:
        s = TLSStream.client(context.client_context(None, ca.bundle), sock)
        s.handshake(time.monotonic() + 5)
        return s.recv(10, time.monotonic() + 5)  # TLS 1.3: the refusal arrives after the client's Finished

    server, client_res = _pair(context.server_context(srv, ca.bundle), client)
    assert isinstance(server, PeerRejected)
    assert "did not return a certificate" in server.detail
    assert isinstance(client_res, TapproofError)


def test_client_from_other_ca_refused(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, srv, _ = pki
    other = make_ca(tmp_path / "other")
    stranger = host_creds(other, "client")

    def client(sock: socket.socket) -> object:
        s = TLSStream.client(context.client_context(stranger, ca.bundle), sock)
        s.handshake(time.monotonic() + 5)
        return s.recv(10, time.monotonic() + 5)

    server, client_res = _pair(context.server_context(srv, ca.bundle), client)
    assert isinstance(server, PeerRejected)
    assert "certificate verify failed" in server.detail
    assert isinstance(client_res, TapproofError)


def test_server_from_other_ca_refused_by_client(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, _, cli = pki
    other = make_ca(tmp_path / "other")

    def client(sock: socket.socket) -> object:
        s = TLSStream.client(context.client_context(cli, ca.bundle), sock)
        s.handshake(time.monotonic() + 5)
        return s.group

    _server, client_res = _pair(context.server_context(host_creds(other, "s"), other.bundle), client)
    assert isinstance(client_res, PeerRejected)
    assert client_res.reason is PeerReason.HANDSHAKE_FAILED
    assert "certificate verify failed" in client_res.detail


def test_handshake_deadline_on_silent_peer(pki) -> None:  # type: ignore[no-untyped-def]
    ca, srv, _ = pki
    a, b = socket.socketpair()
    try:
        s = TLSStream.server(context.server_context(srv, ca.bundle), a)
        start = time.monotonic()
        with pytest.raises(HandshakeTimeout):
            s.handshake(time.monotonic() + 0.3)
        assert time.monotonic() - start < 2.0
    finally:
        a.close()
        b.close()
