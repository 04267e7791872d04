"""The I/O side of multiplexing: one event-loop thread per mux connection (see :mod:`tapproof.tunnel.mux`).

One thread owns the TLS connection and every stream's plaintext socket:
``selectors`` (epoll) over non-blocking sockets, TLS through direct cffi
``SSL_read``/``SSL_write`` as in :mod:`tapproof.tunnel.relay`. The ``SSL``
object is only touched by the loop thread; other threads hand work in through
:meth:`MuxLoop.submit` (a queue plus an eventfd).

Per stream the loop keeps a few fields and, only while bytes are in flight, a
list of pending chunks: an idle stream costs its socket and a small object.
Flow control: a stream's plaintext socket is read only while the peer granted
credit (:meth:`mux.MuxConnection.send_window`) and while the TLS output is
below :data:`TLS_HIGH_WATER`; bytes from the peer are acknowledged only once
written to the plaintext socket. Ends: both directions FIN -> orderly close;
a plaintext RST, a peer RST, a dead mux connection, :meth:`MuxLoop.stop` or
the idle timeout -> the plaintext socket is closed with an RST (``SO_LINGER``
0), so an application never takes a truncation for a clean end.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from tapproof.errors import RemoteProtocolError
from tapproof.tunnel import mux, preamble
from tapproof.tunnel.relay import EndReason, RelayResult, Side, tls_error_detail

log = logging.getLogger(__name__)

__all__ = ["MuxLoop", "OpenRefused", "ServerHooks", "StreamHooks", "run_in_thread"]

READ_SIZE = 64 * 1024
"""Most plaintext bytes read from one stream's socket at once (one DATA frame)."""
TLS_READ_SIZE = 256 * 1024
"""Decrypted bytes gathered (record by record) before the codec parses them."""
STREAM_WINDOW = 2 * 1024 * 1024
"""Credit each side grants per stream (:class:`mux.MuxConnection` ``recv_window``): the most
buffered for one stream. 256 KiB (the protocol's initial window) held one bulk stream to
~3 Gbit/s here, the loops idle waiting for WINDOW frames; see bench/PROFILE.md."""
TLS_HIGH_WATER = 4 * 1024 * 1024
"""TLS output bytes queued above which no plaintext socket is read."""
TLS_LOW_WATER = 1024 * 1024
PING_AFTER = 15.0
"""Seconds without a byte from the peer after which the client pings."""
DEAD_AFTER = 45.0
"""Seconds without a byte from the peer after which the connection is declared dead."""
CONNECT_TIMEOUT = 5.0
TICK = 1.0

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE
_LINGER0 = b"\x01\x00\x00\x00\x00\x00\x00\x00"
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN


class StreamHooks(Protocol):
    """What the agent does for one stream: count, log, register for revocation."""

    def accepted(self, stop: Callable[[], None]) -> None:
        """The stream is open (200); ``stop`` aborts it from any thread."""

    def refused(self, reason: str, status: int | None, detail: str) -> None:
        """The stream never opened (refused, or its connection failed first)."""

    def ended(self, result: RelayResult) -> None:
        """An open stream ended."""


@dataclasses.dataclass(frozen=True)
class OpenRefused:
    """The server's answer to an OPEN it will not serve: ``status`` goes back (the hooks logged it)."""

    status: int


class ServerHooks(Protocol):
    """The server agent's checks for each OPEN."""

    def on_open(
        self, target: preamble.Target, source: str | None
    ) -> OpenRefused | tuple[socket.socket, Any, StreamHooks]:
        """Refuse, or return a fresh non-blocking socket, the address to connect it to, and the stream's hooks."""


class _Conn(Exception):
    """The mux connection ended (reason, side, detail)."""

    def __init__(self, reason: EndReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Stream:
    __slots__ = (
        "connect_deadline",
        "down",
        "events",
        "fd",
        "fin_recv",
        "fin_sent",
        "hooks",
        "last_io",
        "open",
        "out",
        "out_off",
        "paused",
        "shut",
        "sid",
        "sock",
        "start",
        "up",
    )

    def __init__(self, sid: int, sock: socket.socket, hooks: StreamHooks, now: float) -> None:
        self.sid = sid
        self.sock = sock
        self.fd = sock.fileno()
        self.hooks = hooks
        self.open = False  # 200 seen/sent: bytes may flow
        self.connect_deadline = 0.0  # server: connecting to the service until then
        self.out: collections.deque[bytes] | None = None  # peer bytes not yet written to sock
        self.out_off = 0
        self.fin_sent = False  # sock EOF relayed as FIN
        self.fin_recv = False  # the peer's FIN arrived
        self.shut = False  # SHUT_WR done on sock
        self.paused = False  # not read: TLS output above the high water mark
        self.events = 0
        self.up = 0  # sock -> peer bytes
        self.down = 0  # peer -> sock bytes
        self.start = now
        self.last_io = now


def _abort_sock(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    with contextlib.suppress(OSError):
        sock.close()


class MuxLoop:
    """Drive one handshaken mux connection (client or server side) until it ends; see the module doc."""

    def __init__(
        self,
        conn: SSL.Connection,
        *,
        client: bool,
        server_hooks: ServerHooks | None = None,
        idle_timeout: float | None = 3600.0,
        client_idle_close: float = 30.0,
        on_idle: Callable[[MuxLoop], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not client and server_hooks is None:
            raise ValueError("a server loop needs server hooks")
        self.conn = conn
        self.mux = mux.MuxConnection(client=client, recv_window=STREAM_WINDOW)
        self.client = client
        self._server = server_hooks
        self._idle = idle_timeout
        self._idle_close = client_idle_close
        self._on_idle = on_idle
        self._clock = clock
        self._streams: dict[int, _Stream] = {}
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._tls_out: collections.deque[bytes | bytearray] = collections.deque()
        self._tls_out_off = 0
        self._tls_out_len = 0
        self._paused: list[_Stream] = []
        self._draining = False
        self.dead = False
        """Set once the loop ended (by the loop thread)."""
        self.opened = 0
        """Streams opened on this connection so far."""
        self.end: tuple[EndReason, str] | None = None
        """Why the connection ended, once it did."""

    # --- other threads -----------------------------------------------------------------
    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop thread."""
        self._queue.append(fn)
        with self._wake_lock:  # never write to a closed (maybe reused) descriptor number
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

    def stop(self, code: mux.ResetCode = mux.ResetCode.ABORTED) -> None:
        """Reset every stream and close the connection at once (e.g. the peer was revoked)."""
        self.submit(lambda: self._fail(EndReason.LOCAL_ABORT, f"stopped ({code.name.lower()})", code))

    def goaway(self) -> None:
        """Drain: no new streams; the connection closes once its streams ended."""
        self.submit(self._start_drain)

    def drain_queue(self) -> None:
        """After the end (any thread, once nothing can submit any more): run what was still handed in.

        After the end every queued call is harmless: an open refuses itself, a stop or
        goaway finds nothing to do. One that raises anyway is a bug: logged, and the
        rest still run (each may hold an application socket to reset).
        """
        while self._queue:
            try:
                self._queue.popleft()()
            except Exception:
                log.exception("mux loop: a call handed in after the end failed")

    @property
    def stream_count(self) -> int:
        """Streams live right now (read from any thread: approximate)."""
        return len(self._streams)

    # --- loop thread: client API -------------------------------------------------------
    def open_stream(self, app: socket.socket, target: str, source: str | None, hooks: StreamHooks) -> None:
        """(loop thread; use through :meth:`submit`) Open a stream carrying ``app``."""
        if self.dead or not self.mux.can_open():
            _abort_sock(app)
            hooks.refused("mux-unavailable", None, "connection draining")
            return
        sid = self.mux.send_open(target, source)
        self.opened += 1
        app.setblocking(False)
        self._streams[sid] = _Stream(sid, app, hooks, self._clock())

    # --- the loop ----------------------------------------------------------------------
    def run(self) -> tuple[EndReason, str]:
        """Run until the connection ends; every stream is ended (and reported) before it returns."""
        ssl = self.conn._ssl
        sock = self.conn  # pyOpenSSL proxies fileno/setsockopt
        os.set_blocking(sock.fileno(), False)
        _lib.ERR_clear_error()
        self._sel = selectors.DefaultSelector()
        self._tls_fd = sock.fileno()
        self._tls_events = _R
        self._sel.register(self._tls_fd, _R, None)
        self._sel.register(self._wake, _R, None)
        self._rbuf = _ffi.new("char[]", TLS_READ_SIZE)
        self._rmv = memoryview(_ffi.buffer(self._rbuf))  # slices are views (a cffi buffer slice copies)
        self._sbuf = _ffi.new("char[]", mux.HEADER.size + READ_SIZE)
        self._smv = memoryview(_ffi.buffer(self._sbuf))
        self._last_rx = self._clock()
        self._last_tick = self._last_rx
        self._idle_since = self._last_rx
        self._pinged = False
        try:
            self._loop(ssl)
        except _Conn as exc:
            self.end = (exc.reason, exc.detail)
        except Exception as exc:  # a bug: never leave streams hanging
            log.exception("mux loop failed")
            self.end = (EndReason.TLS_ERROR, f"internal error: {exc}")
        finally:
            self._finish()
        assert self.end is not None  # noqa: S101 - set on every path out of _loop
        return self.end

    def _loop(self, ssl: Any) -> None:
        sel = self._sel
        while True:
            while self._queue:
                self._queue.popleft()()
            self._flush_tls(ssl)
            if self._draining and not self._streams and not self._tls_out_len:
                self._close_clean(ssl)
                raise _Conn(EndReason.CLEAN, "drained")
            now = self._clock()
            if now - self._last_tick >= TICK:
                self._tick(now)
                continue
            for key, mask in sel.select(max(0.0, self._last_tick + TICK - now)):
                fd = key.fd
                if fd == self._tls_fd:
                    if mask & _R:
                        self._read_tls(ssl)
                elif fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                else:
                    s = key.data
                    if s.sid not in self._streams:
                        continue
                    if mask & _W:
                        if s.connect_deadline:
                            self._connected(s)
                        else:
                            self._write_plain(s)
                    if mask & _R and s.sid in self._streams:
                        self._read_plain(s)

    # --- TLS side ----------------------------------------------------------------------
    def _read_tls(self, ssl: Any) -> None:
        # Records are decrypted one after another into one buffer (no per-record
        # bytes object, no join); the codec copies it once into its own buffer.
        buf, mv = self._rbuf, self._rmv
        got = 0
        while True:
            r = _lib.SSL_read(ssl, buf + got, TLS_READ_SIZE - got)
            if r > 0:
                got += r
                if got == TLS_READ_SIZE:
                    self._got_tls(mv[:got])
                    got = 0
                continue
            err = _lib.SSL_get_error(ssl, r)
            if err == _WANT_READ:
                break
            if err == _WANT_WRITE:
                self._want_tls(_R | _W)
                break
            if err == _ZERO_RETURN:
                self._handle(mv[:got])
                raise _Conn(EndReason.PEER_RESET if self._streams else EndReason.CLEAN, "peer closed the connection")
            raise _Conn(EndReason.TLS_ERROR, _ssl_error("read", r, err))
        if got:
            self._got_tls(mv[:got])

    def _got_tls(self, data: memoryview) -> None:
        self._last_rx = self._clock()
        self._pinged = False
        self._handle(data)

    def _handle(self, data: bytes | memoryview) -> None:
        if not data:
            return
        try:
            events = self.mux.receive_data(data)
        except RemoteProtocolError as exc:
            raise _Conn(EndReason.TLS_ERROR, f"mux protocol error: {exc}") from None
        for ev in events:
            if isinstance(ev, mux.Data):
                self._on_data(ev.stream_id, ev.data)
            elif isinstance(ev, mux.WindowOpened):
                s = self._streams.get(ev.stream_id)
                if s is not None:
                    self._interest(s)
            elif isinstance(ev, mux.StreamEnded):
                s = self._streams.get(ev.stream_id)
                if s is not None:
                    s.fin_recv = True
                    self._write_plain(s)
            elif isinstance(ev, mux.StreamReset):
                s = self._streams.get(ev.stream_id)
                if s is not None:
                    code = ev.code
                    if not s.open:
                        self._drop(s, "mux-refused" if code == mux.ResetCode.REFUSED else "remote-reset", None, "")
                    else:
                        self._end(s, EndReason.PEER_RESET, Side.TLS, f"peer reset the stream ({code})")
            elif isinstance(ev, mux.OpenResult):
                self._on_result(ev.stream_id, ev.status)
            elif isinstance(ev, mux.StreamOpened):
                self._on_open(ev)
            elif isinstance(ev, mux.GoAway):
                self._draining = True

    def _want_tls(self, events: int) -> None:
        if events != self._tls_events:
            self._sel.modify(self._tls_fd, events, None)
            self._tls_events = events

    def _flush_tls(self, ssl: Any) -> None:
        if self.mux.pending_output:
            data = self.mux.data_to_send()
            self._tls_out.append(data)
            self._tls_out_len += len(data)
        out = self._tls_out
        while out:
            head = out[0]
            if len(out) > 1 and len(head) < 64 * 1024:  # coalesce small frames into one record
                parts = [head[self._tls_out_off :]]
                out.popleft()
                size = len(parts[0])
                while out and size < 256 * 1024:
                    nxt = out.popleft()
                    parts.append(nxt)
                    size += len(nxt)
                head = b"".join(parts)
                out.appendleft(head)
                self._tls_out_off = 0
            off = self._tls_out_off
            n = min(len(head) - off, 256 * 1024)
            cbuf = _ffi.from_buffer(head)
            r = _lib.SSL_write(ssl, cbuf + off, n)
            del cbuf
            if r > 0:
                self._tls_out_len -= r
                if off + r == len(head):
                    out.popleft()
                    self._tls_out_off = 0
                else:
                    self._tls_out_off = off + r
                continue
            err = _lib.SSL_get_error(ssl, r)
            if err == _WANT_WRITE:
                self._want_tls(_R | _W)
                return
            if err == _WANT_READ:
                return
            raise _Conn(EndReason.TLS_ERROR, _ssl_error("write", r, err))
        self._want_tls(_R)
        if self._paused and self._tls_out_len < TLS_LOW_WATER:
            paused, self._paused = self._paused, []
            for s in paused:
                s.paused = False
                if s.sid in self._streams:
                    self._interest(s)

    # --- streams -----------------------------------------------------------------------
    def _interest(self, s: _Stream) -> None:
        want = 0
        if s.connect_deadline:
            want = _W
        elif s.open:
            if not s.fin_sent and not s.paused and self.mux.send_window(s.sid) > 0:
                want |= _R
            if s.out:
                want |= _W
        if want != s.events:
            if s.events == 0:
                self._sel.register(s.fd, want, s)
            elif want == 0:
                self._sel.unregister(s.fd)
            else:
                self._sel.modify(s.fd, want, s)
            s.events = want

    def _read_plain(self, s: _Stream) -> None:
        if self._tls_out_len >= TLS_HIGH_WATER:
            s.paused = True
            self._paused.append(s)
            self._interest(s)
            return
        room = min(self.mux.send_window(s.sid), READ_SIZE)
        if room <= 0 or s.fin_sent:
            self._interest(s)
            return
        # Fast path (nothing queued for TLS): read the application's bytes right behind
        # a reserved frame header and hand header + payload to SSL_write in one call,
        # with no Python copy; otherwise through the codec's output queue (keeps order).
        direct = not self._tls_out and not self.mux.pending_output
        hdr = mux.HEADER.size
        data = b""
        try:
            if direct:
                n = s.sock.recv_into(self._smv[hdr : hdr + room])
            else:
                data = s.sock.recv(room)
                n = len(data)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(s, EndReason.PEER_RESET, Side.PLAIN, f"plain recv: {exc}")
            return
        s.last_io = self._clock()
        if not n:
            s.fin_sent = True
            self.mux.send_fin(s.sid)
            self._interest(s)
            self._maybe_clean(s)
            return
        s.up += n
        if direct:
            self._smv[:hdr] = self.mux.data_frame_header(s.sid, n)
            self._write_direct(hdr + n)
        else:
            self.mux.send_data(s.sid, data)
        if self.mux.send_window(s.sid) == 0:
            self._interest(s)

    def _write_direct(self, total: int) -> None:
        """SSL_write the frame in the send buffer; what it did not take is queued (same bytes, in order)."""
        ssl = self.conn._ssl
        r = _lib.SSL_write(ssl, self._sbuf, total)
        if r == total:
            return
        if r > 0:
            rest = self._smv[r:total].tobytes()
        else:
            err = _lib.SSL_get_error(ssl, r)
            if err not in (_WANT_WRITE, _WANT_READ):
                raise _Conn(EndReason.TLS_ERROR, _ssl_error("write", r, err))
            # OpenSSL may hold part of it: the retry passes the same bytes (pyOpenSSL allows a moved buffer)
            rest = self._smv[:total].tobytes()
            if err == _WANT_WRITE:
                self._want_tls(_R | _W)
        self._tls_out.append(rest)
        self._tls_out_len += len(rest)

    def _on_data(self, sid: int, data: bytes) -> None:
        s = self._streams.get(sid)
        if s is None:
            return
        if s.out is None:
            s.out = collections.deque()
        s.out.append(data)
        self._write_plain(s)

    def _write_plain(self, s: _Stream) -> None:
        out = s.out
        sock = s.sock
        while out:
            head = out[0]
            try:
                n = sock.send(memoryview(head)[s.out_off :] if s.out_off else head)
            except BlockingIOError:
                break
            except OSError as exc:
                self._end(s, EndReason.PEER_RESET, Side.PLAIN, f"plain send: {exc}")
                return
            s.down += n
            s.last_io = self._clock()
            self.mux.consumed(s.sid, n)
            if s.out_off + n == len(head):
                out.popleft()
                s.out_off = 0
            else:
                s.out_off += n
                break
        if not out:
            s.out = None  # idle streams keep no buffer
            if s.fin_recv and not s.shut:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, bytes(8))  # the stream is whole now
                    sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self._end(s, EndReason.PEER_RESET, Side.PLAIN, f"plain shutdown: {exc}")
                    return
                s.shut = True
                self._maybe_clean(s)
                if s.sid not in self._streams:
                    return
        self._interest(s)

    def _maybe_clean(self, s: _Stream) -> None:
        if s.fin_sent and s.shut:
            self._close_stream(s)
            with contextlib.suppress(OSError):
                s.sock.close()
            s.hooks.ended(self._result(s, EndReason.CLEAN, None, ""))

    def _result(self, s: _Stream, reason: EndReason, side: Side | None, detail: str) -> RelayResult:
        return RelayResult(reason, s.up, s.down, self._clock() - s.start, side, detail)

    def _close_stream(self, s: _Stream) -> None:
        self._streams.pop(s.sid, None)
        if s.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(s.fd)
            s.events = 0
        s.out = None
        if not self._streams:
            self._idle_since = self._clock()

    def _end(
        self, s: _Stream, reason: EndReason, side: Side | None, detail: str, code: mux.ResetCode = mux.ResetCode.ABORTED
    ) -> None:
        """Abort an open stream: RST to the peer (unless it reset it) and to the plaintext socket."""
        if s.sid not in self._streams:
            return
        self._close_stream(s)
        if not (reason is EndReason.PEER_RESET and side is Side.TLS):
            self.mux.send_reset(s.sid, code)
        _abort_sock(s.sock)
        s.hooks.ended(self._result(s, reason, side, detail))

    def _drop(self, s: _Stream, reason: str, status: int | None, detail: str) -> None:
        """A stream that never opened: reset its socket, report the refusal."""
        self._close_stream(s)
        _abort_sock(s.sock)
        s.hooks.refused(reason, status, detail)

    def _stop_stream(self, sid: int, code: mux.ResetCode) -> None:
        s = self._streams.get(sid)
        if s is not None:
            if s.open:
                self._end(s, EndReason.LOCAL_ABORT, None, "stopped", code)
            else:
                self.mux.send_reset(sid, code)
                self._drop(s, "stopped", None, "")

    # --- client: results ---------------------------------------------------------------
    def _on_result(self, sid: int, status: int) -> None:
        s = self._streams.get(sid)
        if s is None:
            return
        if status != 200:
            reason = {403: "remote-forbidden", 502: "remote-unavailable", 400: "remote-bad-request"}.get(
                status, "remote-refused"
            )
            self._drop(s, reason, status, "")
            return
        s.open = True
        s.hooks.accepted(lambda: self.submit(lambda: self._stop_stream(sid, mux.ResetCode.REVOKED)))
        self._interest(s)

    # --- server: opens -----------------------------------------------------------------
    def _on_open(self, ev: mux.StreamOpened) -> None:
        assert self._server is not None  # noqa: S101 - checked in __init__
        self.opened += 1
        decision = self._server.on_open(ev.target, ev.source)
        if isinstance(decision, OpenRefused):
            if self.mux.is_open(ev.stream_id):
                self.mux.send_result(ev.stream_id, decision.status)
            return
        sock, addr, hooks = decision
        s = _Stream(ev.stream_id, sock, hooks, self._clock())
        self._streams[s.sid] = s
        try:
            rc = sock.connect_ex(addr)
        except OSError as exc:
            rc = exc.errno or errno.ECONNREFUSED
        if rc == 0:
            self._connected(s)
        elif rc == errno.EINPROGRESS:
            s.connect_deadline = self._clock() + CONNECT_TIMEOUT
            self._interest(s)
        else:
            self._refuse_connect(s, os.strerror(rc))

    def _refuse_connect(self, s: _Stream, detail: str) -> None:
        if self.mux.is_open(s.sid):
            self.mux.send_result(s.sid, 502)
        self._drop(s, "service-unreachable", 502, detail)

    def _connected(self, s: _Stream) -> None:
        err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        s.connect_deadline = 0.0
        if err:
            self._refuse_connect(s, os.strerror(err))
            return
        if not self.mux.is_open(s.sid):  # the client gave up meanwhile
            self._drop(s, "peer-gone", None, "stream reset before the service answered")
            return
        with contextlib.suppress(OSError):
            s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):  # any close before the peer's FIN is relayed is an abort
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        self.mux.send_result(s.sid, 200)
        s.open = True
        sid = s.sid
        s.hooks.accepted(lambda: self.submit(lambda: self._stop_stream(sid, mux.ResetCode.REVOKED)))
        self._interest(s)

    # --- timers, drain, end ------------------------------------------------------------
    def _tick(self, now: float) -> None:
        self._last_tick = now
        quiet = now - self._last_rx
        if quiet > DEAD_AFTER:
            raise _Conn(EndReason.PEER_RESET, f"no answer from the peer for {quiet:.0f}s")
        if self.client and quiet > PING_AFTER and not self._pinged:
            self.mux.send_ping()
            self._pinged = True
        for s in list(self._streams.values()):
            if s.connect_deadline and now > s.connect_deadline:
                self._refuse_connect(s, "connect timed out")
            elif self._idle is not None and s.open and now - s.last_io > self._idle and not s.out:
                self._end(s, EndReason.IDLE_TIMEOUT, None, f"idle for {self._idle:g}s", mux.ResetCode.IDLE_TIMEOUT)
        if (
            self.client
            and not self._streams
            and not self._draining
            and now - self._idle_since > self._idle_close
            and (self._on_idle is None or self._on_idle(self))
        ):
            self._start_drain()

    def _start_drain(self) -> None:
        self._draining = True
        self.mux.send_goaway()

    def _close_clean(self, ssl: Any) -> None:
        _lib.SSL_shutdown(ssl)  # best effort (one try, non-blocking): the streams all ended cleanly
        _lib.ERR_clear_error()

    def _fail(self, reason: EndReason, detail: str, code: mux.ResetCode) -> None:
        if self.dead:  # a stop handed in after the end: every stream was already reset and reported
            return
        for s in list(self._streams.values()):
            if s.open:
                self._end(s, reason, None, detail, code)
            else:
                self.mux.send_reset(s.sid, code)
                self._drop(s, "stopped", None, detail)
        with contextlib.suppress(_Conn):  # best effort: the connection is being failed anyway
            self._flush_tls(self.conn._ssl)
        raise _Conn(reason, detail)

    def _finish(self) -> None:
        """The connection is over: every stream is reset and reported, every socket closed."""
        self.dead = True
        reason, detail = self.end or (EndReason.TLS_ERROR, "ended")
        for s in list(self._streams.values()):
            if s.open:
                self._close_stream(s)
                _abort_sock(s.sock)
                s.hooks.ended(self._result(s, EndReason.TLS_ERROR, Side.TLS, f"mux connection ended: {detail}"))
            else:
                self._drop(s, "mux-connection-lost", None, detail)
        self.drain_queue()  # opens handed in after the end: run them, they refuse themselves
        with contextlib.suppress(OSError):
            self._sel.close()
        with self._wake_lock:
            os.close(self._wake)
            self._wake = -1
        if reason is not EndReason.CLEAN:
            with contextlib.suppress(OSError):
                self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        with contextlib.suppress(OSError):
            self.conn.close()
        _lib.ERR_clear_error()


def _ssl_error(op: str, ret: int, err: int) -> str:
    saved = _ffi.errno
    if err == _lib.SSL_ERROR_SYSCALL:
        _lib.ERR_clear_error()
        if ret == 0 or saved == 0:
            return f"tls {op}: eof without close_notify"
        return f"tls {op}: {os.strerror(saved)}"
    return f"tls {op}: {tls_error_detail(f'ssl error {err}')}"


def run_in_thread(loop: MuxLoop, name: str, after: Callable[[MuxLoop], None]) -> threading.Thread:
    """Start ``loop`` on its own daemon thread; ``after`` runs when it ended."""

    def main() -> None:
        try:
            loop.run()
        finally:
            after(loop)

    t = threading.Thread(target=main, name=name, daemon=True)
    t.start()
    return t
