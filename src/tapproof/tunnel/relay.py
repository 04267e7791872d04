"""The byte relay: plaintext TCP socket <-> pyOpenSSL TLS connection, both ways.

Design (chosen by measurement, ``bench/relay_speed.py``; figures below)
-----------------------------------------------------------------------
One thread per tunnel drives BOTH directions with ``poll`` over two
non-blocking sockets (plus an eventfd for :meth:`Relay.stop`):

* TLS side: ``SSL_read``/``SSL_write`` called directly through pyOpenSSL's
  cffi binding (``OpenSSL._util.lib``) on preallocated ``char[]`` buffers:
  pyOpenSSL's ``Connection.recv_into`` allocates and copies a temporary buffer
  per call, ``send`` wraps ``ffi.from_buffer`` and checks three callback
  helpers per call. ``SSL_MODE_ENABLE_PARTIAL_WRITE`` is cleared so one
  ``SSL_write`` pushes a whole 256 KiB chunk (16 records) per Python call, and
  successive ``SSL_read`` results (one record each) are gathered into one
  buffer before one ``send`` on the plaintext side.
* Plaintext side: ``recv_into`` a memoryview of the same cffi buffer that
  ``SSL_write`` reads from, ``send`` from a memoryview of the buffer that
  ``SSL_read`` filled: no copy in Python, no per-byte work. TCP_NODELAY.
* cffi releases the GIL around every C call (and the socket module around
  every syscall), so N tunnels on N threads use all cores for the crypto.

Why not two threads per tunnel (one per direction)? OpenSSL documents an
``SSL`` object as not safe for concurrent use from several threads
(openssl-threads(7): only objects documented as thread-safe may be shared;
``SSL`` is not: ``SSL_read`` and ``SSL_write`` share the record layer state,
the error/rwstate fields, alerts and TLS 1.3 KeyUpdate handling). A correct
two-thread design needs a lock around every SSL call, which must not be held
while blocking, so the TLS socket has to be non-blocking anyway, and the two
directions then serialise on the lock for the crypto: the only overlap left is
plaintext syscalls, paid for with a lock and a thread switch per chunk.
Measured on this project's machine (2 noisy vCPUs, loopback; ``python
bench/relay_speed.py --bytes 256M --runs 3``: 256 MiB per connection in BOTH
directions at once, the two relays in two processes and the app/service in a
third, all on the same 2 cores; Gbit/s of both directions summed, median and
(min-max) of 3 runs):

    ==============================  ================  ================
    design                          1 connection      4 connections
    ==============================  ================  ================
    plain stdlib relay (the limit)  6.23 (4.49-8.66)  9.85 (7.54-13.81)
    poll, 1 thread, cffi (chosen)   5.74 (4.92-5.86)  5.29 (5.25-6.31)
    poll, 1 thread, pyOpenSSL API   2.94 (2.25-3.04)  2.53 (1.87-2.54)
    2 threads + lock, cffi          3.46 (3.37-4.11)  4.53 (4.31-4.54)
    ==============================  ================  ================

The chosen design reaches ~92% of the plaintext relay with one connection
and is 1.7x the two-thread design there, 2x the same loop through
pyOpenSSL's API. With 4 connections every design is CPU-bound on the two
cores shared by three processes (TLS adds AES-GCM plus one extra record
layer pass per byte), the two-thread design comes close (4.5 vs 5.3) but
pays a lock, twice the threads and a thread switch per chunk, for no gain.

Semantics
---------
* Half-close: plaintext EOF -> TLS ``close_notify`` (TLS 1.3 allows the other
  direction to keep flowing); the TLS peer's ``close_notify`` ->
  ``shutdown(SHUT_WR)`` on the plaintext socket. The relay ends cleanly when
  both directions have ended this way; since it has by then read the peer's
  ``close_notify`` and the plaintext EOF, nothing unread is left to turn the
  final ``close()`` into an RST.
* Abrupt ends (RST, TLS error, EOF without ``close_notify``, idle timeout,
  :meth:`Relay.stop`) abort BOTH sockets with an RST (``SO_LINGER`` 0): an
  application never sees a truncation as a clean EOF.
* Backpressure: one fixed buffer per direction; a direction whose buffer is
  full (not yet flushed) does not read.
* Idle timeout: ``poll`` with a deadline; no ``settimeout`` on the TLS socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "SMALL_BUFFER_SIZE",
    "EndReason",
    "Relay",
    "RelayResult",
    "Side",
    "relay",
    "tls_error_detail",
]

DEFAULT_BUFFER_SIZE = 256 * 1024
"""Bytes per direction buffer once data flows in bulk (>= 64 KiB; 256 KiB measured best)."""

SMALL_BUFFER_SIZE = 16 * 1024
"""Bytes per direction buffer until a read fills it (idle tunnels stay small)."""

_alloc = _ffi.new_allocator(should_clear_after_alloc=False)

_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_SYSCALL = _lib.SSL_ERROR_SYSCALL
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


class EndReason(enum.Enum):
    """Why a relay ended (for logs and metrics)."""

    CLEAN = "clean"
    IDLE_TIMEOUT = "idle-timeout"
    PEER_RESET = "peer-reset"
    TLS_ERROR = "tls-error"
    LOCAL_ABORT = "local-abort"


class Side(enum.Enum):
    """Which socket an abrupt end came from."""

    PLAIN = "plain"
    TLS = "tls"


@dataclasses.dataclass(frozen=True)
class RelayResult:
    """What a relay did: bytes each way, why it ended, and how long it ran."""

    reason: EndReason
    plain_to_tls: int
    tls_to_plain: int
    duration: float
    side: Side | None = None
    detail: str = ""

    @property
    def clean(self) -> bool:
        """True when both directions ended with an orderly close."""
        return self.reason is EndReason.CLEAN


class _Abort(Exception):
    def __init__(self, reason: EndReason, side: Side | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.side = side
        self.detail = detail


def tls_error_detail(default: str = "tls error") -> str:
    """Drain the thread's OpenSSL error queue into a short string (``default`` if it was empty)."""
    parts: list[str] = []
    for _ in range(16):
        code = _lib.ERR_get_error()
        if code == 0:
            break
        reason = _lib.ERR_reason_error_string(code)
        parts.append(_ffi.string(reason).decode("ascii", "replace") if reason != _ffi.NULL else str(code))
    return "; ".join(parts) or default


def _set_linger0(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


class Relay:
    """Move bytes both ways between ``plain`` and ``tls`` until both directions end.

    ``plain`` is a connected stream socket (TCP or Unix); ``tls`` a handshaken
    pyOpenSSL connection over a connected TCP socket. The relay owns both from
    :meth:`run` on and closes them when it returns. ``to_plain`` / ``to_tls``
    are bytes already read (preamble leftovers) to deliver first.
    ``idle_timeout`` (seconds, None for none) ends a tunnel in which no byte
    moved for that long. :meth:`stop` may be called from any thread.
    """

    def __init__(
        self,
        plain: socket.socket,
        tls: SSL.Connection,
        *,
        idle_timeout: float | None = 300.0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        to_plain: bytes = b"",
        to_tls: bytes = b"",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if buffer_size < 64 * 1024:
            raise ValueError("buffer_size must be at least 64 KiB")
        if len(to_plain) > buffer_size or len(to_tls) > buffer_size:
            raise ValueError("initial data larger than the buffer")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive or None")
        self._plain = plain
        self._tls = tls
        self._idle = idle_timeout
        self._size = buffer_size
        self._clock = clock
        self._initial = (to_plain, to_tls)
        self._stop_lock = threading.Lock()
        self._stop_requested = False
        self._wake_fd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._started = False
        self.plain_to_tls = 0
        """Bytes written to the TLS side so far (live, for metrics)."""
        self.tls_to_plain = 0
        """Bytes written to the plaintext side so far (live, for metrics)."""
        self.result: RelayResult | None = None
        """The result once :meth:`run` returned."""

    def stop(self) -> None:
        """Abort the tunnel (e.g. its peer was revoked): both sockets get an RST."""
        with self._stop_lock:
            self._stop_requested = True
            if self._wake_fd is not None:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._wake_fd, 1)

    def run(self) -> RelayResult:
        """Relay until both directions end or the tunnel aborts; close both sockets."""
        if self._started:
            raise RuntimeError("a relay runs once")
        self._started = True
        start = self._clock()
        reason, side, detail = EndReason.CLEAN, None, ""
        try:
            self._loop()
        except _Abort as exc:
            reason, side, detail = exc.reason, exc.side, exc.detail
        finally:
            with self._stop_lock:
                if self._wake_fd is not None:
                    os.close(self._wake_fd)
                    self._wake_fd = None
            if reason is not EndReason.CLEAN:
                _set_linger0(self._plain)
                _set_linger0(self._tls)
            with contextlib.suppress(OSError):
                self._plain.close()
            with contextlib.suppress(OSError):
                self._tls.close()
            _lib.ERR_clear_error()
        self.result = RelayResult(reason, self.plain_to_tls, self.tls_to_plain, self._clock() - start, side, detail)
        return self.result

    def _loop(self) -> None:  # one hot loop, kept in one frame on purpose
        plain = self._plain
        tls = self._tls
        ssl = tls._ssl
        size = self._size
        ssl_read = _lib.SSL_read
        ssl_write = _lib.SSL_write
        get_error = _lib.SSL_get_error
        clock = self._clock

        plain.setblocking(False)
        with contextlib.suppress(OSError):
            plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls_fd = tls.fileno()
        os.set_blocking(tls_fd, False)
        with contextlib.suppress(OSError):
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        plain_fd = plain.fileno()
        # Until the peer's close_notify has been relayed as a FIN, any close of the plaintext socket is an
        # abort, including the kernel's close when this process dies (kill -9): linger 0 makes that an RST,
        # so the application sees an error, never an orderly EOF after a short read.
        _set_linger0(plain)
        _lib.SSL_clear_mode(ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        _lib.ERR_clear_error()

        # Buffers start small (an idle or chatty tunnel never needs more) and grow to
        # ``size`` once a read fills one: bulk flows get the measured-best 256 KiB.
        to_plain, to_tls = self._initial
        self._initial = (b"", b"")
        ucap = size if len(to_tls) > SMALL_BUFFER_SIZE else SMALL_BUFFER_SIZE
        dcap = size if len(to_plain) > SMALL_BUFFER_SIZE else SMALL_BUFFER_SIZE
        ubuf = _alloc("char[]", ucap)  # plain -> tls
        umv = memoryview(_ffi.buffer(ubuf))
        dbuf = _alloc("char[]", dcap)  # tls -> plain
        dmv = memoryview(_ffi.buffer(dbuf))
        up_grow = down_grow = False
        dlen, doff = len(to_plain), 0
        dmv[:dlen] = to_plain
        ulen, uoff = len(to_tls), 0
        umv[:ulen] = to_tls

        up_eof = False  # plaintext EOF read
        up_done = False  # close_notify sent
        down_eof = False  # peer close_notify read
        down_done = False  # SHUT_WR sent on plain
        up_wait = 0  # poll events the TLS write side waits for
        down_wait = 0  # poll events the TLS read side waits for
        plain_out_blocked = False
        poller = select.poll()
        wake_fd = self._wake_fd
        if wake_fd is None:  # run() after stop() has closed nothing yet; cannot happen
            raise _Abort(EndReason.LOCAL_ABORT, None, "stopped")
        poller.register(wake_fd, _POLLIN)
        registered = {plain_fd: 0, tls_fd: 0}
        poller.register(plain_fd, 0)
        poller.register(tls_fd, 0)
        last_io = clock()
        idle = self._idle

        while not (up_done and down_done):
            if self._stop_requested:
                raise _Abort(EndReason.LOCAL_ABORT, None, "stopped")
            moved = False

            # plain -> buffer
            if ulen == 0 and not up_eof:
                if up_grow:
                    ubuf = _alloc("char[]", size)
                    umv = memoryview(_ffi.buffer(ubuf))
                    ucap, up_grow = size, False
                try:
                    n = plain.recv_into(umv)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _Abort(EndReason.PEER_RESET, Side.PLAIN, f"plain recv: {exc}") from None
                else:
                    if n == 0:
                        up_eof = True
                    else:
                        ulen, uoff = n, 0
                        up_grow = n == ucap < size
                    moved = True

            # buffer -> tls
            if ulen > uoff:
                r = ssl_write(ssl, ubuf + uoff, ulen - uoff)
                if r > 0:
                    uoff += r
                    self.plain_to_tls += r
                    up_wait = 0
                    moved = True
                    if uoff == ulen:
                        ulen = uoff = 0
                else:
                    up_wait = self._want(ssl, r, get_error(ssl, r), "write")
            elif up_eof and ulen == 0 and not up_done:
                r = _lib.SSL_shutdown(ssl)
                if r >= 0:
                    up_done = True
                    up_wait = 0
                    moved = True
                else:
                    up_wait = self._want(ssl, r, get_error(ssl, r), "shutdown")

            # tls -> buffer (gather several records into one plaintext send)
            if dlen == 0 and down_grow:
                dbuf = _alloc("char[]", size)
                dmv = memoryview(_ffi.buffer(dbuf))
                dcap, down_grow = size, False
            if dlen < dcap and not down_eof:
                for _ in range(64):
                    r = ssl_read(ssl, dbuf + dlen, dcap - dlen)
                    if r > 0:
                        dlen += r
                        down_wait = 0
                        moved = True
                        if dlen == dcap:
                            down_grow = dcap < size
                            break
                        continue
                    err = get_error(ssl, r)
                    if err == _ZERO_RETURN:
                        down_eof = True
                        down_wait = 0
                        moved = True
                    else:
                        down_wait = self._want(ssl, r, err, "read")
                    break

            # buffer -> plain
            if dlen > doff:
                try:
                    n = plain.send(dmv[doff:dlen])
                except BlockingIOError:
                    plain_out_blocked = True
                except OSError as exc:
                    raise _Abort(EndReason.PEER_RESET, Side.PLAIN, f"plain send: {exc}") from None
                else:
                    plain_out_blocked = False
                    doff += n
                    self.tls_to_plain += n
                    moved = True
                    if doff == dlen:
                        dlen = doff = 0
            elif down_eof and dlen == 0 and not down_done:
                try:
                    plain.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, bytes(8))  # the stream is whole now
                    plain.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    raise _Abort(EndReason.PEER_RESET, Side.PLAIN, f"plain shutdown: {exc}") from None
                down_done = True
                moved = True

            if moved:
                continue

            # Nothing moved: wait for the sockets (or the stop eventfd, or the idle deadline).
            want_plain = 0
            if ulen == 0 and not up_eof:
                want_plain |= _POLLIN
            if dlen > doff and plain_out_blocked:
                want_plain |= _POLLOUT
            want_tls = 0
            if ulen > uoff or (up_eof and not up_done):
                want_tls |= up_wait
            if dlen < dcap and not down_eof:
                want_tls |= down_wait
            for fd, want in ((plain_fd, want_plain), (tls_fd, want_tls)):
                have = registered[fd]
                if want != have:
                    if have < 0:
                        poller.register(fd, want)
                    else:
                        poller.modify(fd, want)
                    registered[fd] = want
            now = clock()
            if idle is None:
                timeout_ms = None
            else:
                left = last_io + idle - now
                if left <= 0:
                    raise _Abort(EndReason.IDLE_TIMEOUT, None, f"idle for {idle:g}s")
                timeout_ms = int(left * 1000) + 1
            events = poller.poll(timeout_ms)
            if not events:
                continue  # the deadline check above ends it
            last_io = clock()
            for fd, ev in events:
                if fd == wake_fd:
                    raise _Abort(EndReason.LOCAL_ABORT, None, "stopped")
                if ev & select.POLLNVAL:
                    raise _Abort(EndReason.LOCAL_ABORT, None, "socket closed under the relay")
                if ev & select.POLLERR:
                    self._check_so_error(fd, plain if fd == plain_fd else tls)
                if ev & (select.POLLHUP | select.POLLERR) and not ev & registered[fd]:
                    # A hang-up we are not ready to act on (its direction is blocked on
                    # the other socket): stop polling the fd, or poll would spin on it.
                    # It is polled again as soon as we want to read or write it.
                    poller.unregister(fd)
                    registered[fd] = -1

    @staticmethod
    def _check_so_error(fd: int, sock: Any) -> None:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            side = Side.PLAIN if isinstance(sock, socket.socket) else Side.TLS
            raise _Abort(EndReason.PEER_RESET, side, f"{side.value} socket: {os.strerror(err)}")

    def _want(self, ssl: Any, ret: int, err: int, op: str) -> int:
        """Map an SSL_get_error result to the poll events to wait for, or abort."""
        if err == _WANT_READ:
            return _POLLIN
        if err == _WANT_WRITE:
            return _POLLOUT
        saved = _ffi.errno
        if err == _SYSCALL:
            _lib.ERR_clear_error()
            if saved in _RESET_ERRNOS:
                raise _Abort(EndReason.PEER_RESET, Side.TLS, f"tls {op}: {os.strerror(saved)}")
            if ret == 0 or saved == 0:
                raise _Abort(EndReason.TLS_ERROR, Side.TLS, f"tls {op}: eof without close_notify")
            raise _Abort(EndReason.TLS_ERROR, Side.TLS, f"tls {op}: {os.strerror(saved)}")
        if err == _lib.SSL_ERROR_SSL:
            code = _lib.ERR_peek_error()
            if _lib.ERR_GET_REASON(code) == _lib.SSL_R_UNEXPECTED_EOF_WHILE_READING:
                _lib.ERR_clear_error()
                raise _Abort(EndReason.TLS_ERROR, Side.TLS, f"tls {op}: eof without close_notify")
            detail = tls_error_detail()
            if code == 0 and saved in _RESET_ERRNOS:
                raise _Abort(EndReason.PEER_RESET, Side.TLS, f"tls {op}: {os.strerror(saved)}")
            raise _Abort(EndReason.TLS_ERROR, Side.TLS, f"tls {op}: {detail}")
        _lib.ERR_clear_error()
        raise _Abort(EndReason.TLS_ERROR, Side.TLS, f"tls {op}: ssl error {err}")


def relay(plain: socket.socket, tls: SSL.Connection, **kwargs: Any) -> RelayResult:
    """Run a :class:`Relay` over ``plain`` and ``tls`` to its end (keyword args as Relay)."""
    return Relay(plain, tls, **kwargs).run()
