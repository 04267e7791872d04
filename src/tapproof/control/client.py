"""API client: HTTP/1.1 over mutual TLS (h11), failover across servers.

One request per TLS connection, except inside :meth:`APIClient.session`: there the
calls of one thread share one keep-alive connection (an agent's sync round makes
four or five calls; each new connection is a full post-quantum mutual handshake on
both ends, the largest part of a round's cost on the server).

The server must prove ``spiffe://TD/tapproof/server`` with a chain to the
trust bundle; enrollment uses the pinned-root bootstrap instead (no bundle yet), and
presents a self-signed bootstrap certificate for the key of its CSR.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import h11
from OpenSSL import SSL

from tapproof import identity
from tapproof.control import tlsctx
from tapproof.errors import APIError, PeerReason, PeerRejected, TransportError
from tapproof.pki.keys import PrivateKey
from tapproof.tls import pinning
from tapproof.tls.peer import check_peer
from tapproof.tls.stream import TLSStream, connect
from tapproof.units import parse_hostport

log = logging.getLogger(__name__)
MAX_RESPONSE = 4 * 1024 * 1024
_REPEATABLE = frozenset({"GET", "PUT", "HEAD"})  # methods a session may send again on a new connection


def _roundtrip(
    stream: TLSStream,
    method: str,
    path: str,
    body: Any,
    headers: Sequence[tuple[str, str]],
    host: str,
    timeout: float,
    *,
    keep_alive: bool = False,
) -> tuple[int, dict[str, str], Any]:
    deadline = time.monotonic() + timeout
    payload = b"" if body is None else json.dumps(body).encode()
    h = h11.Connection(h11.CLIENT)  # a fresh one per request: a kept connection carries one exchange at a time
    hdrs = [
        ("Host", host),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        *([] if keep_alive else [("Connection", "close")]),
        *headers,
    ]
    out = h.send(h11.Request(method=method, target=path, headers=hdrs)) or b""
    if payload:
        out += h.send(h11.Data(data=payload)) or b""
    out += h.send(h11.EndOfMessage()) or b""
    stream.sendall(out, deadline)
    resp: h11.Response | None = None
    data = bytearray()
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise TransportError(f"bad HTTP from server: {exc}") from exc
        if event is h11.NEED_DATA:
            chunk = stream.recv(65536, deadline)
            h.receive_data(chunk)
            continue
        if isinstance(event, h11.Response):
            resp = event
        elif isinstance(event, h11.Data):
            data += event.data
            if len(data) > MAX_RESPONSE:
                raise TransportError("server response too large")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if resp is None:
        raise TransportError("server closed the connection without answering")
    rh = {k.decode().lower(): v.decode("latin-1") for k, v in resp.headers}
    parsed: Any = None
    if data:
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise TransportError("server answered with invalid JSON") from exc
    return resp.status_code, rh, parsed


_ALERT = re.compile(r"(?:tlsv1[0-9]?|sslv3|tls) alert ([a-z0-9 ]+)", re.IGNORECASE)


def tls_alert(exc: BaseException) -> str | None:
    """The TLS alert a server answered with (``certificate expired``, ``unknown ca``...), or None."""
    m = _ALERT.search(str(exc))
    return m.group(1).strip().lower() if m else None


def _failure(failures: Sequence[tuple[str, Exception]]) -> TransportError:
    """What went wrong with every server: a TLS alert is an answer (a refusal), not silence."""
    refused = [(s, a) for s, exc in failures if (a := tls_alert(exc))]
    if refused:
        server, alert = refused[0]
        hint = " (our certificate expired: the server's renewal grace may have passed)" if "expired" in alert else ""
        others = f"; {len(failures) - 1} other server(s) failed too" if len(failures) > 1 else ""
        return TransportError(f"control-plane server {server} refused the TLS handshake: {alert}{hint}{others}")
    detail = "; ".join(f"{s}: {exc}" for s, exc in failures) or "none tried"
    closed = [s for s, exc in failures if "connection lost" in str(exc) or "without answering" in str(exc)]
    if closed:
        return TransportError(
            f"control-plane server {closed[0]} closed the connection after the TLS handshake without answering "
            f"(it may have refused our certificate: see its log) ({detail})"
        )
    return TransportError(f"no control-plane server answered ({detail})")


def _raise_for(status: int, parsed: Any) -> None:
    if status < 400:
        return
    err = parsed.get("error", {}) if isinstance(parsed, dict) else {}
    raise APIError(status, str(err.get("code", "error")), str(err.get("message", f"http {status}")))


class APIClient:
    """Calls the control-plane API as an agent or admin (mutual TLS, verified server)."""

    def __init__(
        self,
        servers: Sequence[str],
        trust_domain: str,
        ctx_factory: Callable[[], SSL.Context],
        *,
        timeout: float = 10.0,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        mark: int | None = None,
    ) -> None:
        if not servers:
            raise TransportError("no control-plane server address configured")
        self.servers = list(servers)
        self.td = trust_domain
        self.ctx_factory = ctx_factory
        self.timeout = timeout
        self.now = now
        self.mark = mark  # SO_MARK for transparent mode (see tls.stream.connect)
        self._preferred = 0  # the server that answered last: tried first next time (failover sticks)
        self._session: int | None = None  # the thread inside session(), if any
        self._session_lock = threading.Lock()
        self._held: tuple[str, TLSStream] | None = None  # its kept connection: (server, stream)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Within the block, this thread's idempotent calls (GET, PUT) reuse one keep-alive connection;
        it is closed on exit.

        A kept connection that fails is replaced by a new one, with the usual failover: safe only
        because GET and PUT may be repeated. A POST (``/v1/renew``) always gets a connection of its
        own and is never sent twice by the session. A 503 moves on to the other servers as outside a
        session. Other threads' calls meanwhile use their own connections; a second session (nested,
        or in another thread) shares nothing.
        """
        me = threading.get_ident()
        with self._session_lock:
            mine = self._session is None
            if mine:
                self._session = me
        if not mine:
            yield
            return
        try:
            yield
        finally:
            self.reset()
            with self._session_lock:
                self._session = None

    def reset(self) -> None:
        """Close the kept connection, if any (after a trust bundle or credential change: the next call
        makes a new connection and verifies the server against the new material)."""
        self._drop(abort=False)

    def _drop(self, *, abort: bool) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        if abort:
            held[1].abort()
        else:
            held[1].close(time.monotonic() + 1.0)

    def _keep(self, server: str, stream: TLSStream) -> bool:
        self._drop(abort=False)
        self._held = (server, stream)
        return True

    def _call_held(
        self, method: str, path: str, body: Any, headers: Sequence[tuple[str, str]]
    ) -> tuple[int, dict[str, str], Any] | None:
        """The call over the kept connection, or None when there is none or it failed (then: a new one)."""
        if self._held is None:
            return None
        server, stream = self._held
        try:
            status, rh, parsed = _roundtrip(stream, method, path, body, headers, server, self.timeout, keep_alive=True)
        except TransportError:  # closed meanwhile, or no full answer: the caller repeats (GET/PUT only)
            self._drop(abort=True)
            return None
        if status == 503:
            self._drop(abort=False)
            if server in self.servers and len(self.servers) > 1:  # start the failover with the next server
                self._preferred = (self.servers.index(server) + 1) % len(self.servers)
            return None
        if rh.get("connection", "").lower() == "close":
            self._drop(abort=False)
        _raise_for(status, parsed)
        return status, rh, parsed

    def call(
        self, method: str, path: str, body: Any = None, headers: Sequence[tuple[str, str]] = ()
    ) -> tuple[int, dict[str, str], Any]:
        """Make one call; try each server in turn on transport errors and 503s."""
        in_session = self._session == threading.get_ident() and method in _REPEATABLE
        if in_session:
            answer = self._call_held(method, path, body, headers)
            if answer is not None:
                return answer

        def verify(stream: TLSStream) -> None:
            check_peer(
                stream,
                trust_domain=self.td,
                now=self.now(),
                usage="server",
                accept=lambda s: s.kind is identity.Kind.SERVER,
            )

        servers = list(self.servers)
        start = self._preferred % len(servers) if servers else 0
        order = servers[start:] + servers[:start]

        def answered(server: str) -> None:
            if server in self.servers:
                self._preferred = self.servers.index(server)

        return _call_any(
            order,
            self.ctx_factory,
            verify,
            method,
            path,
            body,
            headers,
            timeout=self.timeout,
            mark=self.mark,
            on_answer=answered,
            keep=self._keep if in_session else None,
        )

    def server_date(self) -> str | None:
        """The ``Date`` header of a server whose certificate verifies in every respect but the clock.

        For telling clock skew apart from a bad certificate after a handshake
        check failed: the answer's body is not used.
        """

        def verify_at(stream: TLSStream, when: dt.datetime) -> None:
            check_peer(
                stream, trust_domain=self.td, now=when, usage="server", accept=lambda s: s.kind is identity.Kind.SERVER
            )

        return date_probe(self.servers, self.ctx_factory, verify_at, timeout=self.timeout, mark=self.mark)

    def get(self, path: str) -> Any:
        """GET and return the JSON body."""
        return self.call("GET", path)[2]

    def post(self, path: str, body: Any) -> Any:
        """POST JSON and return the JSON body."""
        return self.call("POST", path, body)[2]


def _call_any(
    servers: Sequence[str],
    ctx_factory: Callable[[], SSL.Context],
    verify: Callable[[TLSStream], None],
    method: str,
    path: str,
    body: Any,
    headers: Sequence[tuple[str, str]],
    *,
    timeout: float,
    mark: int | None = None,
    on_answer: Callable[[str], None] | None = None,
    keep: Callable[[str, TLSStream], bool] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """Connect to each server in turn, ``verify`` it (raises: no retry), then make the request.

    Transport errors, refused handshakes and 503 answers move on to the next
    server; an identity ``verify`` refuses is raised at once, before a byte of
    the request is sent. ``on_answer`` learns which server gave the final answer
    (not a 503). With ``keep`` the request asks for keep-alive, and the
    connection that answered goes to ``keep`` instead of being closed (unless the
    server said it closes it).
    """
    last: Exception | None = None
    failures: list[tuple[str, Exception]] = []
    for server in servers:
        host, port = parse_hostport(server, what="server address")
        try:
            stream = connect((host, port), ctx_factory(), timeout=timeout, mark=mark)
        except (TransportError, PeerRejected) as exc:
            last = exc
            failures.append((server, exc))
            continue
        try:
            verify(stream)
            status, rh, parsed = _roundtrip(
                stream, method, path, body, headers, server, timeout, keep_alive=keep is not None
            )
        except TransportError as exc:
            stream.abort()
            last = exc
            failures.append((server, exc))
            continue
        except BaseException:
            stream.abort()
            raise
        closing = rh.get("connection", "").lower() == "close"
        if keep is None or status == 503 or closing or not keep(server, stream):
            stream.close(time.monotonic() + 1.0)
        if status == 503 and server != servers[-1]:
            last = APIError(503, "unavailable", f"{server} is unavailable")
            continue
        if on_answer is not None and status != 503:
            on_answer(server)
        _raise_for(status, parsed)
        return status, rh, parsed
    if isinstance(last, APIError | PeerRejected):
        raise last
    raise _failure(failures)


def date_probe(
    servers: Sequence[str],
    ctx_factory: Callable[[], SSL.Context],
    verify_at: Callable[[TLSStream, dt.datetime], object],
    *,
    timeout: float = 10.0,
    mark: int | None = None,
) -> str | None:
    """``GET /v1/bundle`` and return its ``Date`` header, the server's certificate checked by
    ``verify_at`` as of the middle of its own validity (pins, chain, identity: all but our clock).

    Only the header is used: this tells a wrong local clock from a bad certificate.
    """

    def verify(stream: TLSStream) -> None:
        leaf = stream.conn.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            raise PeerRejected(PeerReason.NO_CERTIFICATE, "server presented no certificate")
        verify_at(stream, leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2)

    _status, headers, _body = _call_any(
        servers, ctx_factory, verify, "GET", "/v1/bundle", None, (), timeout=timeout, mark=mark
    )
    return headers.get("date")


def enroll_pinned(
    servers: Sequence[str],
    trust_domain: str,
    fingerprint: str,
    body: dict[str, Any],
    key: PrivateKey,
    *,
    timeout: float = 10.0,
) -> Any:
    """POST /v1/enroll to the first server whose chain ends at the pinned root.

    The client presents a self-signed bootstrap certificate for ``key``, the key of
    the CSR in ``body`` (the server requires a client certificate on every connection
    and binds the enrollment to it). The pinned-root check runs before the request
    (and its join secret) is sent.
    """
    return pinned_call(servers, trust_domain, fingerprint, key, "POST", "/v1/enroll", body, timeout=timeout)[2]


def pinned_call(
    servers: Sequence[str],
    trust_domain: str,
    fingerprint: str,
    key: PrivateKey,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], Any]:
    """One call on a public route with the bootstrap certificate for ``key``, to a server whose
    chain ends at the pinned root (checked before the request is sent): (status, headers, body)."""

    def verify(stream: TLSStream) -> None:
        pinning.verify_pinned(stream, fingerprint, trust_domain, dt.datetime.now(dt.UTC))

    return _call_any(
        servers, lambda: tlsctx.bootstrap_client_context(key), verify, method, path, body, (), timeout=timeout
    )
