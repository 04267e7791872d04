"""The byte relay on loopback: real sockets, real pyOpenSSL mutual TLS 1.3 (X25519MLKEM768).

Topology of every test::

    app <-TCP-> [relay A] <=TLS 1.3=> [relay B] <-TCP-> svc
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tapproof.tunnel.preamble import ClientPreamble, ServerPreamble
from tapproof.tunnel.relay import EndReason, Relay, RelayResult, Side
from tests.integration.tlspair import Credentials, make_credentials, negotiated_group, tls_pair

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def creds() -> Credentials:
    return make_credentials()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return a, b


@dataclasses.dataclass
class Tunnel:
    app: socket.socket
    svc: socket.socket
    relay_a: Relay
    relay_b: Relay
    threads: list[threading.Thread]

    def join(self) -> tuple[RelayResult, RelayResult]:
        for t in self.threads:
            t.join(TIMEOUT)
            assert not t.is_alive(), "relay did not end"
        assert self.relay_a.result is not None
        assert self.relay_b.result is not None
        return self.relay_a.result, self.relay_b.result

    def close(self) -> None:
        self.app.close()
        self.svc.close()


def start_tunnel(creds: Credentials, **kw_a: object) -> Tunnel:
    tls_a, tls_b = tls_pair(creds)
    assert negotiated_group(tls_a) == "X25519MLKEM768"
    app, a_plain = tcp_pair()
    svc, b_plain = tcp_pair()
    relay_a = Relay(a_plain, tls_a, **kw_a)  # type: ignore[arg-type]
    relay_b = Relay(b_plain, tls_b, idle_timeout=TIMEOUT)
    threads = [threading.Thread(target=r.run, daemon=True) for r in (relay_a, relay_b)]
    for t in threads:
        t.start()
    return Tunnel(app, svc, relay_a, relay_b, threads)


@pytest.fixture
def tunnel(creds: Credentials) -> Iterator[Tunnel]:
    t = start_tunnel(creds, idle_timeout=TIMEOUT)
    yield t
    t.close()


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 16):
        out += chunk
    return bytes(out)


def _send_stream(sock: socket.socket, nbytes: int, seed: int, digest: list[str]) -> None:
    h = hashlib.sha256()
    block = hashlib.sha256(b"%d" % seed).digest() * (1 << 15)  # 1 MiB
    mv = memoryview(block)
    left = nbytes
    i = 0
    while left:
        n = min(left, len(block) - 7919 * i % 4096)
        part = mv[7919 * i % 4096 : 7919 * i % 4096 + n]
        sock.sendall(part)
        h.update(part)
        left -= n
        i += 1
    sock.shutdown(socket.SHUT_WR)
    digest.append(h.hexdigest())


def _recv_stream(sock: socket.socket, out: list[tuple[int, str]]) -> None:
    h = hashlib.sha256()
    buf = bytearray(1 << 18)
    total = 0
    while n := sock.recv_into(buf):
        h.update(memoryview(buf)[:n])
        total += n
    out.append((total, h.hexdigest()))


def test_64mb_each_way_at_once_sha256(tunnel: Tunnel) -> None:
    size = 64 << 20
    sent_up: list[str] = []
    sent_down: list[str] = []
    got_up: list[tuple[int, str]] = []
    got_down: list[tuple[int, str]] = []
    workers = [
        threading.Thread(target=_send_stream, args=(tunnel.app, size, 1, sent_up)),
        threading.Thread(target=_send_stream, args=(tunnel.svc, size, 2, sent_down)),
        threading.Thread(target=_recv_stream, args=(tunnel.svc, got_up)),
        threading.Thread(target=_recv_stream, args=(tunnel.app, got_down)),
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(TIMEOUT)
    res_a, res_b = tunnel.join()
    assert got_up == [(size, sent_up[0])]
    assert got_down == [(size, sent_down[0])]
    assert res_a.reason is EndReason.CLEAN
    assert res_b.reason is EndReason.CLEAN
    assert (res_a.plain_to_tls, res_a.tls_to_plain) == (size, size)
    assert (res_b.plain_to_tls, res_b.tls_to_plain) == (size, size)


def test_half_close_app_first(tunnel: Tunnel) -> None:
    """Request, app shuts its write side, the service answers after seeing EOF."""
    tunnel.app.sendall(b"GET everything\n")
    tunnel.app.shutdown(socket.SHUT_WR)
    assert recv_all(tunnel.svc) == b"GET everything\n"
    reply = os.urandom(3 << 20)
    tunnel.svc.sendall(reply)
    tunnel.svc.shutdown(socket.SHUT_WR)
    assert recv_all(tunnel.app) == reply
    res_a, res_b = tunnel.join()
    assert res_a.clean
    assert res_b.clean
    assert res_a.tls_to_plain == len(reply)


def test_half_close_service_first(tunnel: Tunnel) -> None:
    """The service sends a banner and shuts its write side; the app still talks after EOF."""
    tunnel.svc.sendall(b"banner\n")
    tunnel.svc.shutdown(socket.SHUT_WR)
    assert recv_all(tunnel.app) == b"banner\n"
    upload = os.urandom(3 << 20)
    tunnel.app.sendall(upload)
    tunnel.app.shutdown(socket.SHUT_WR)
    assert recv_all(tunnel.svc) == upload
    res_a, res_b = tunnel.join()
    assert res_a.clean
    assert res_b.clean


def _abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_app_reset_reaches_service_as_reset(tunnel: Tunnel) -> None:
    tunnel.app.sendall(b"x" * 100_000)
    assert len(tunnel.svc.recv(1 << 16)) > 0
    _abort(tunnel.app)
    with pytest.raises(ConnectionResetError):
        recv_all(tunnel.svc)
    res_a, res_b = tunnel.join()
    assert (res_a.reason, res_a.side) == (EndReason.PEER_RESET, Side.PLAIN)
    assert (res_b.reason, res_b.side) == (EndReason.PEER_RESET, Side.TLS)


def test_service_reset_reaches_app_as_reset(tunnel: Tunnel) -> None:
    tunnel.svc.sendall(b"y" * 1000)
    assert tunnel.app.recv(1000)
    _abort(tunnel.svc)
    with pytest.raises(ConnectionResetError):
        recv_all(tunnel.app)
    res_a, res_b = tunnel.join()
    assert res_b.reason is EndReason.PEER_RESET
    assert res_a.reason is EndReason.PEER_RESET


def test_tls_truncation_is_not_eof(creds: Credentials) -> None:
    """The TLS peer's TCP FIN without close_notify: the app gets an RST, not an EOF."""
    tls_a, tls_b = tls_pair(creds)
    app, a_plain = tcp_pair()
    relay = Relay(a_plain, tls_a, idle_timeout=TIMEOUT)
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    tls_b.sendall(b"partial answer")
    assert app.recv(100) == b"partial answer"
    tls_b.sock_shutdown(socket.SHUT_RDWR)
    with pytest.raises(ConnectionResetError):
        recv_all(app)
    t.join(TIMEOUT)
    assert relay.result is not None
    assert (relay.result.reason, relay.result.side) == (EndReason.TLS_ERROR, Side.TLS)
    tls_b.close()
    app.close()


def test_idle_timeout(creds: Credentials) -> None:
    t = start_tunnel(creds, idle_timeout=0.3)
    try:
        t.app.sendall(b"hello")
        assert t.svc.recv(5) == b"hello"
        start = time.monotonic()
        with pytest.raises(ConnectionResetError):
            recv_all(t.app)
        res_a, res_b = t.join()
        assert 0.25 < time.monotonic() - start < 5
        assert res_a.reason is EndReason.IDLE_TIMEOUT
        assert res_b.reason is EndReason.PEER_RESET
        with pytest.raises(ConnectionResetError):
            recv_all(t.svc)
    finally:
        t.close()


def test_stop_aborts_a_live_tunnel(tunnel: Tunnel) -> None:
    tunnel.app.sendall(b"ping")
    assert tunnel.svc.recv(4) == b"ping"
    tunnel.relay_b.stop()
    with pytest.raises(ConnectionResetError):
        recv_all(tunnel.svc)
    with pytest.raises(ConnectionResetError):
        recv_all(tunnel.app)
    res_a, res_b = tunnel.join()
    assert res_b.reason is EndReason.LOCAL_ABORT
    assert res_a.reason is EndReason.PEER_RESET
    assert res_a.plain_to_tls == 4
    tunnel.relay_b.stop()  # after the end: harmless


def test_backpressure_bounds_buffering(tunnel: Tunnel) -> None:
    """A service that does not read stops the app's writes after a bounded amount."""
    tunnel.app.settimeout(0.5)
    block = b"z" * (1 << 20)
    sent = 0
    with pytest.raises(TimeoutError):  # noqa: PT012 (the write that blocks is unknown)
        for _ in range(512):
            tunnel.app.sendall(block)
            sent += len(block)
    # Socket buffers on four sockets plus two 256 KiB relay buffers: far below 512 MiB.
    assert sent < 64 << 20
    tunnel.relay_a.stop()
    tunnel.join()


def test_preamble_then_relay_with_pipelined_bytes(creds: Credentials) -> None:
    """CONNECT + first payload in one write; the leftovers are relayed first, in order."""
    tls_a, tls_b = tls_pair(creds)
    client = ClientPreamble("redis", request_id="t1")
    tls_a.sendall(client.request() + b"PING\r\n")
    server = ServerPreamble()
    req = None
    while req is None:
        req = server.feed(tls_b.recv(4096))
    assert req.target.name == "redis"
    tls_b.sendall(server.respond(200) + b"+HELLO\r\n")
    resp = None
    while resp is None:
        resp = client.feed(tls_a.recv(4096))
    assert resp.ok
    app, a_plain = tcp_pair()
    svc, b_plain = tcp_pair()
    ra = Relay(a_plain, tls_a, to_plain=client.leftover)
    rb = Relay(b_plain, tls_b, to_plain=server.leftover)
    threads = [threading.Thread(target=r.run, daemon=True) for r in (ra, rb)]
    for t in threads:
        t.start()
    app.sendall(b"PING2\r\n")
    app.shutdown(socket.SHUT_WR)
    assert recv_all(svc) == b"PING\r\nPING2\r\n"
    svc.sendall(b"+PONG\r\n")
    svc.shutdown(socket.SHUT_WR)
    assert recv_all(app) == b"+HELLO\r\n+PONG\r\n"
    for t in threads:
        t.join(TIMEOUT)
    assert ra.result is not None
    assert rb.result is not None
    assert ra.result.clean
    assert rb.result.clean
    app.close()
    svc.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_concurrent_small_connections_and_fds_back_to_baseline(creds: Credentials) -> None:
    baseline = _fd_count()
    tunnels = [start_tunnel(creds, idle_timeout=TIMEOUT) for _ in range(40)]
    errors: list[BaseException] = []

    def talk(t: Tunnel, i: int) -> None:
        try:
            msg = b"%d:" % i + os.urandom(2000)
            t.app.sendall(msg)
            t.app.shutdown(socket.SHUT_WR)
            assert recv_all(t.svc) == msg
            t.svc.sendall(msg[::-1])
            t.svc.shutdown(socket.SHUT_WR)
            assert recv_all(t.app) == msg[::-1]
        except BaseException as exc:  # noqa: BLE001 (reported by the test thread)
            errors.append(exc)

    workers = [threading.Thread(target=talk, args=(t, i)) for i, t in enumerate(tunnels)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(TIMEOUT)
    assert not errors
    for t in tunnels:
        res_a, res_b = t.join()
        assert res_a.clean
        assert res_b.clean
        t.close()
    deadline = time.monotonic() + 5
    while _fd_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fd_count() <= baseline
