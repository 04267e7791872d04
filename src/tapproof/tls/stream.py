"""A TLS connection with deadlines: handshake, read, write and a clean close.

``socket.settimeout()`` makes pyOpenSSL raise ``WantReadError`` mid-operation,
so the socket stays non-blocking and every operation loops on
``WantRead``/``WantWrite`` with ``select`` until its own deadline. Each
operation is tried first and only then waited for, because OpenSSL may hold
decrypted bytes that ``select`` cannot see.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from tapproof.errors import HandshakeTimeout, PeerReason, PeerRejected, TransportError
from tapproof.tls import unsafe
from tapproof.tls.context import _OP_ALLOW_NO_DHE_KEX, PQ_GROUP, negotiated_group

T = TypeVar("T")


def _wait(sock: socket.socket, *, write: bool, deadline: float, what: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise (HandshakeTimeout if what == "handshake" else TransportError)(f"{what} timed out")
    # poll, not select: select() cannot watch a descriptor >= 1024 (FD_SETSIZE) and raised
    # ValueError once a process held that many sockets (found by tests/battery/test_slowloris.py)
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(math.ceil(remaining * 1000)):
        raise (HandshakeTimeout if what == "handshake" else TransportError)(f"{what} timed out")


class TLSStream:
    """One established (or establishing) TLS connection over a non-blocking socket."""

    def __init__(self, conn: SSL.Connection, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock
        sock.setblocking(False)

    @classmethod
    def client(cls, ctx: SSL.Context, sock: socket.socket) -> TLSStream:
        """Wrap a connected socket as the TLS client side (no SNI: peers are checked by SPIFFE ID)."""
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        return cls(conn, sock)

    @classmethod
    def server(cls, ctx: SSL.Context, sock: socket.socket) -> TLSStream:
        """Wrap an accepted socket as the TLS server side."""
        conn = SSL.Connection(ctx, sock)
        conn.set_accept_state()
        return cls(conn, sock)

    def handshake(self, deadline: float) -> None:
        """Run the handshake until done or ``deadline`` (monotonic); then require TLS 1.3 + PQ."""
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                _wait(self.sock, write=False, deadline=deadline, what="handshake")
            except SSL.WantWriteError:
                _wait(self.sock, write=True, deadline=deadline, what="handshake")
            except SSL.Error as exc:
                raise PeerRejected(PeerReason.HANDSHAKE_FAILED, _describe(exc)) from exc
            except OSError as exc:
                raise TransportError(f"handshake: {exc}") from exc
        self.require_pq()

    def require_pq(self) -> None:
        """Fail closed unless TLS 1.3 with X25519MLKEM768 was negotiated (belt and braces:
        the contexts offer nothing else, unless made unsafe by ``tls.unsafe``)."""
        version = self.conn.get_protocol_version_name()
        if version != "TLSv1.3":
            raise PeerRejected(PeerReason.NOT_TLS13, f"negotiated {version}")
        if _lib.SSL_session_reused(self.conn._ssl) and _lib.SSL_get_options(self.conn._ssl) & _OP_ALLOW_NO_DHE_KEX:
            # psk_ke resumes without any key exchange, and OpenSSL then reports the ORIGINAL session's
            # group: the group check below cannot see it. Only a connection allowing psk_ke can get it.
            raise PeerRejected(PeerReason.NOT_PQ, "resumed on a connection that allows psk_ke (no key exchange)")
        group = negotiated_group(self.conn)
        if group != PQ_GROUP and not (group and unsafe.classical_allowed(self.conn.get_context())):
            raise PeerRejected(PeerReason.NOT_PQ, f"negotiated group {group or 'unknown'}, {PQ_GROUP} required")

    @property
    def group(self) -> str:
        """The negotiated key-exchange group."""
        return negotiated_group(self.conn)

    def recv(self, size: int, deadline: float) -> bytes:
        """Read up to ``size`` bytes; ``b""`` on a clean close_notify; TransportError otherwise."""
        while True:
            try:
                return self.conn.recv(size)
            except SSL.WantReadError:
                _wait(self.sock, write=False, deadline=deadline, what="read")
            except SSL.WantWriteError:
                _wait(self.sock, write=True, deadline=deadline, what="read")
            except SSL.ZeroReturnError:
                return b""
            except SSL.SysCallError as exc:
                raise TransportError(f"connection lost: {_describe(exc)}") from exc
            except SSL.Error as exc:
                raise TransportError(f"tls error: {_describe(exc)}") from exc

    def sendall(self, data: bytes, deadline: float) -> None:
        """Write all of ``data`` before ``deadline``."""
        view = memoryview(data)
        while view:
            try:
                n = self.conn.send(view[: 256 * 1024])
                view = view[n:]
            except SSL.WantWriteError:
                _wait(self.sock, write=True, deadline=deadline, what="write")
            except SSL.WantReadError:
                _wait(self.sock, write=False, deadline=deadline, what="write")
            except SSL.Error as exc:
                raise TransportError(f"write failed: {_describe(exc)}") from exc

    def close(self, deadline: float | None = None) -> None:
        """Send close_notify, drain until the peer's close (bounded), then close the socket.

        Closing with unread data in the kernel buffer would send an RST that can
        destroy data the peer has not read yet; draining first avoids it.
        """
        deadline = deadline if deadline is not None else time.monotonic() + 2.0
        try:
            with contextlib.suppress(SSL.WantReadError, SSL.WantWriteError):
                self.conn.shutdown()
            for _ in range(1024):
                if not self.recv(64 * 1024, deadline):
                    break
        except (TransportError, SSL.Error, OSError):
            pass  # the peer is gone or slow: nothing more to deliver
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()

    def abort(self) -> None:
        """Close at once with an RST (the peer must see an error, not a clean end)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            self.sock.close()


def _describe(exc: Exception) -> str:
    if isinstance(exc, SSL.SysCallError):
        return str(exc.args[1] if len(exc.args) > 1 else exc)
    if exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        parts = [str(e[2]) for e in exc.args[0] if isinstance(e, tuple) and len(e) == 3]
        if parts:
            return "; ".join(parts)
    return str(exc) or type(exc).__name__


SO_MARK = getattr(socket, "SO_MARK", 36)  # Linux; the constant is missing from some Pythons

KEEPALIVE_IDLE = 10
"""Seconds of silence on a tunnel socket before the kernel sends the first TCP keepalive probe."""
KEEPALIVE_INTERVAL = 5
"""Seconds between keepalive probes."""
USER_TIMEOUT = 20
"""Seconds a tunnel socket may go without an ACK for data it sent, or without an answer to a
keepalive probe, before the kernel aborts it (``TCP_USER_TIMEOUT``): the bound within which a
silent partition (packets dropped, no RST) ends a tunnel, idle or busy, instead of the kernel's
~15 minutes of retransmissions (busy) or never (idle, until ``--idle-timeout``)."""


def set_liveness(sock: socket.socket) -> None:
    """TCP keepalive plus ``TCP_USER_TIMEOUT`` on a tunnel socket: a dead peer is found within
    :data:`USER_TIMEOUT` (+ one probe interval), whether the tunnel is idle or sending.

    Best effort: a platform without these options keeps the kernel's defaults.
    """
    opts = (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), USER_TIMEOUT // KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), USER_TIMEOUT * 1000),
    )
    for level, opt, value in opts:
        if opt is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, opt, value)


def connect(
    address: tuple[str, int],
    ctx: SSL.Context,
    *,
    timeout: float = 10.0,
    mark: int | None = None,
    prepare: Callable[[SSL.Connection], object] | None = None,
) -> TLSStream:
    """Connect TCP + TLS to ``address`` within ``timeout`` seconds (PQ group enforced).

    The socket gets :func:`set_liveness` (a silent partition ends it within
    :data:`USER_TIMEOUT`). ``mark`` sets ``SO_MARK`` before connecting, so that transparent mode's
    redirect rules let the agent's own connections through instead of looping.
    ``prepare`` is called with the ``SSL.Connection`` before the handshake (e.g. to
    offer a stored session, :class:`tapproof.tls.sessions.SessionStore`).
    """
    deadline = time.monotonic() + timeout
    where = f"{address[0]}:{address[1]}"
    try:
        family, type_, proto, _, sockaddr = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise TransportError(f"cannot resolve {where}: {exc.strerror or exc}") from exc
    sock = socket.socket(family, type_, proto)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_liveness(sock)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    stream = TLSStream.client(ctx, sock)
    if prepare is not None:
        prepare(stream.conn)
    try:
        stream.handshake(deadline)
    except BaseException:
        stream.abort()
        raise
    return stream
