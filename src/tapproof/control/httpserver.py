"""The API server shell: TCP accept, TLS 1.3 + X25519MLKEM768 handshake with a deadline
(a client certificate required: an identity or a bootstrap one, see ``control.tlsctx``),
peer checks, then HTTP/1.1 via h11 (keep-alive), one thread per connection (bounded).

The logic is in ``control.api``/``control.service``; this module owns the connections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

import h11
from OpenSSL import SSL
from prometheus_client import Counter, Gauge

from tapproof.control import api, tlsctx
from tapproof.control.service import ControlPlane
from tapproof.errors import PeerRejected, StoreError, TransportError
from tapproof.listener import Listener
from tapproof.logs import log_event
from tapproof.tls.stream import TLSStream
from tapproof.units import format_hostport

log = logging.getLogger(__name__)
HANDSHAKE_FAILED = Counter("tapproof_server_handshakes_failed", "TLS handshakes refused", ["reason"])
HANDSHAKES = Counter("tapproof_server_handshakes", "TLS handshakes completed (before the peer checks)")
CONNECTIONS = Gauge("tapproof_server_connections", "Open API connections")

HANDSHAKE_TIMEOUT = 5.0
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 256
MAX_HEADER_BYTES = 64 * 1024


class APIServer:
    """Serve the control-plane API on one listening socket (accept loop: :class:`tapproof.listener.Listener`)."""

    def __init__(self, cp: ControlPlane, ctx_factory: Callable[[], SSL.Context], sock: socket.socket):
        self.cp = cp
        self.ctx_factory = ctx_factory
        self._stop = threading.Event()
        self.listener = Listener(
            sock,
            self._serve_one,
            name="api",
            max_workers=MAX_CONNECTIONS,
            on_refuse=lambda reason: HANDSHAKE_FAILED.labels(reason).inc(),
        )

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.listener.sock.getsockname()[1])

    def start(self) -> None:
        """Start accepting (in a thread)."""
        self.listener.start()

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, wait up to ``grace`` seconds for requests in flight."""
        self._stop.set()
        self.listener.stop()
        self.listener.wait_idle(grace)

    def _serve_one(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        source = format_hostport(addr[0], addr[1])
        CONNECTIONS.inc()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = TLSStream.server(self.ctx_factory(), conn)
            unavailable: StoreError | None = None
            peer: tlsctx.APIPeer | None = None
            tlsctx.take_verify_error()
            try:
                stream.handshake(time.monotonic() + HANDSHAKE_TIMEOUT)
                HANDSHAKES.inc()
                peer = self._peer(stream)
            except StoreError as exc:
                # revocations cannot be read: the peer is not trusted, and it gets 503s, nothing else
                unavailable = exc
            except (PeerRejected, TransportError) as exc:
                self._refuse(stream, source, exc, "handshake-refused", tlsctx.take_verify_error())
                return
            self._http(stream, peer, source, unavailable)
            stream.close()
        except Exception:
            log.exception("connection-error", extra={"event": "connection-error", "source": source})
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            CONNECTIONS.dec()

    @staticmethod
    def _refuse(stream: TLSStream, source: str, exc: Exception, event: str, verify_errno: int = 0) -> None:
        """Log and count a refused peer, then abort the connection."""
        # (a database outage is not a refusal: the peer gets 503s, see _serve_one)
        reason = tlsctx.handshake_reason(exc, verify_errno) if isinstance(exc, PeerRejected) else "transport"
        HANDSHAKE_FAILED.labels(reason).inc()
        log_event(log, event, level=logging.WARNING, reason=reason, source=source, detail=str(exc))
        stream.abort()

    def _peer(self, stream: TLSStream) -> tlsctx.APIPeer:
        """The verified peer (an identity, or a bootstrap certificate for the public routes),
        checked against revocations and the clock.

        Run at the handshake and again before every request on the connection, so a
        keep-alive connection does not outlive a revocation or the certificate's expiry.
        """
        return tlsctx.authenticate(
            stream,
            trust_domain=self.cp.td,
            now=self.cp.clock.now(),
            revoked=self.cp.revoked_serials(),
            grace=self.cp.config.renew_grace,
        )

    def _http(
        self, stream: TLSStream, peer: tlsctx.APIPeer | None, source: str, unavailable: StoreError | None = None
    ) -> None:
        """Serve requests until the peer closes; with ``unavailable`` set, every answer is a 503."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while not self._stop.is_set():
            try:
                req = self._read_request(h, stream, peer, source)
            except h11.RemoteProtocolError as exc:
                self._send(
                    h, stream, api.Response(exc.error_status_hint, {"error": {"code": "bad-http", "message": str(exc)}})
                )
                return
            except TransportError:
                return
            if req is None:
                return
            if peer is not None and not peer.bootstrap and unavailable is None:
                try:
                    fresh = self._peer(stream)
                    if fresh.expired != peer.expired:  # expired since the handshake: only POST /v1/renew now
                        peer = fresh
                        req = dataclasses.replace(req, peer_expired=fresh.expired)
                except StoreError as exc:
                    unavailable = exc
                except PeerRejected as exc:
                    self._refuse(stream, source, exc, "peer-refused-mid-connection")
                    return
            resp = api.handle(self.cp, req) if unavailable is None else api.unavailable(req, unavailable)
            try:
                self._send(h, stream, resp)
            except TransportError:
                return
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                return
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _next(self, h: h11.Connection, stream: TLSStream, deadline: float) -> object:
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            h.receive_data(stream.recv(65536, deadline))

    def _read_request(
        self, h: h11.Connection, stream: TLSStream, peer: tlsctx.APIPeer | None, source: str
    ) -> api.Request | None:
        deadline = time.monotonic() + IDLE_TIMEOUT
        event = self._next(h, stream, deadline)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > api.MAX_BODY:
            raise h11.RemoteProtocolError("request body too large (limit 1 MiB)", error_status_hint=413)
        body = bytearray()
        while True:
            ev = self._next(h, stream, deadline)
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > api.MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large (limit 1 MiB)", error_status_hint=413)
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError("unexpected event", error_status_hint=400)
        url = urllib.parse.urlsplit(event.target.decode("ascii", "replace"))
        query = dict(urllib.parse.parse_qsl(url.query))
        return api.Request(
            peer_serial=peer.serial if peer is not None and not peer.bootstrap else "",
            method=event.method.decode("ascii", "replace"),
            path=url.path,
            query=query,
            body=bytes(body),
            peer=peer.spiffe_id if peer is not None else None,
            source=source,
            if_none_match=headers.get("if-none-match", ""),
            peer_key=peer.key if peer is not None else b"",
            peer_expired=peer is not None and peer.expired,
        )

    def _send(self, h: h11.Connection, stream: TLSStream, resp: api.Response) -> None:
        if resp.body is None:
            payload = b""
        elif isinstance(resp.body, bytes):  # already encoded (the registry: cached per version)
            payload = resp.body
        else:
            payload = json.dumps(resp.body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload))), *resp.headers]
        headers.append(("Date", email.utils.formatdate(usegmt=True)))  # tapproof doctor reads it (clock skew)
        if resp.status >= 400 and resp.status not in (403, 404, 409):
            headers.append(("Connection", "close"))
        deadline = time.monotonic() + IDLE_TIMEOUT
        try:
            out = h.send(h11.Response(status_code=resp.status, headers=headers))
            out = (out or b"") + (h.send(h11.Data(data=payload)) or b"") if payload else out
            out = (out or b"") + (h.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as exc:
            raise TransportError(f"cannot send response: {exc}") from exc
        stream.sendall(out, deadline)
