"""Outbound tunnels: a local plaintext connection carried to a service on another host's agent.

For each accepted application connection (a ``--route`` listener, or the
transparent listener): resolve the destination host's tunnel address through
the registry cache, connect with mutual TLS (contexts built once per
credential generation), require the peer to be exactly
``spiffe://TD/host/HOST`` and not revoked, send ``CONNECT``, and relay on
``200``. On ``403``/``502`` or any failure the application connection is
reset (never a clean EOF that could pass for an empty answer). The
application's bytes wait in the kernel until the far side said ``200``: not
one is sent to an unverified peer.

With ``--mux`` the connection is carried as a stream over a pooled
connection to the peer agent instead (:mod:`tapproof.agent.muxpool`; same
checks, per-stream OPEN and result), unless the peer does not multiplex.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from tapproof.agent import events
from tapproof.agent.config import Route
from tapproof.agent.inbound import is_own_address
from tapproof.agent.metrics import HANDSHAKE_SECONDS, HANDSHAKES
from tapproof.agent.muxpool import MuxPool
from tapproof.agent.peerdial import CONNECT_TIMEOUT, DialRefused, dial_peer
from tapproof.agent.runtime import Runtime
from tapproof.errors import ProtocolError, TapproofError, TransportError
from tapproof.identity import host_id
from tapproof.tunnel import preamble
from tapproof.tunnel.relay import Relay
from tapproof.units import format_hostport

log = logging.getLogger(__name__)

__all__ = ["CONNECT_TIMEOUT", "RouteHandler", "TransparentHandler", "open_tunnel", "try_mux_stream"]

DIRECTION = "outbound"


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _source(app_addr: object) -> str:
    return format_hostport(app_addr[0], app_addr[1]) if isinstance(app_addr, tuple) else str(app_addr)


def _fields(rt: Runtime, host: str, target: str, via: str) -> dict[str, object]:
    return {"peer": str(host_id(rt.trust_domain, host)), "service": target, "via": via}


def try_mux_stream(
    rt: Runtime, app: socket.socket, app_addr: tuple[str, int], host: str, target: str, via: str
) -> bool:
    """Without blocking: carry ``app`` on a ready pooled mux connection (True), or leave it (False).

    Called in the accept loop. Anything that could wait (a refusal to log is
    fine, a handshake is not) is left to :func:`open_tunnel` in a worker thread,
    which repeats these checks.
    """
    pool = rt.mux_pool
    if not rt.config.mux or pool is None or host in rt.policy.revoked_hosts:
        return False
    addr = rt.registry.advertise(host)
    if addr is None:
        return False
    fields = {**_fields(rt, host, target, via), "address": format_hostport(*addr), "source": _source(app_addr)}
    return pool.try_open(rt, app, host, target, _source_header(app_addr), fields)


def open_tunnel(rt: Runtime, app: socket.socket, app_addr: tuple[str, int], host: str, target: str, via: str) -> None:
    """Tunnel ``app`` to ``target`` (service name or ``ip:port``) on host ``host``; owns ``app``."""
    start = time.monotonic()
    source = _source(app_addr)
    fields = _fields(rt, host, target, via)
    if host in rt.policy.revoked_hosts:
        _reset(app)
        events.refused(DIRECTION, "peer-revoked", **fields)
        return
    addr = rt.registry.advertise(host)
    if addr is None:
        _reset(app)
        events.refused(DIRECTION, "unknown-host", **fields)
        return
    fields["address"] = format_hostport(*addr)
    if rt.config.mux and _pool(rt).open(rt, app, host, target, _source_header(app_addr), {**fields, "source": source}):
        return  # carried as a stream of a pooled mux connection (or refused, logged); False: peer has no mux
    material = rt.creds.current
    sessions = rt.sessions
    peer_key = (host, addr)
    try:
        dialed = dial_peer(rt, host, addr, material, prepare=lambda conn: sessions.offer(conn, material, peer_key))
    except DialRefused as exc:
        sessions.forget(material, peer_key)
        _reset(app)
        resumed_field = {} if exc.resumed is None else {"resumed": exc.resumed}
        events.refused(DIRECTION, exc.reason, detail=exc.detail, **resumed_field, **fields)
        return
    stream, serial, resumed = dialed.stream, dialed.serial, dialed.resumed
    HANDSHAKE_SECONDS.labels(DIRECTION).observe(time.monotonic() - start)
    HANDSHAKES.labels(DIRECTION, "resumed" if resumed else "full").inc()
    fields["group"] = stream.group
    fields["resumed"] = resumed
    cp = preamble.ClientPreamble(target, source=_source_header(app_addr))
    deadline = time.monotonic() + CONNECT_TIMEOUT
    try:
        stream.sendall(cp.request(), deadline)
        resp = None
        while resp is None:
            data = stream.recv(16384, deadline)
            if not data:
                cp.feed_eof()
            resp = cp.feed(data)
    except (TransportError, ProtocolError) as exc:
        sessions.forget(material, peer_key)
        stream.abort()
        _reset(app)
        events.refused(DIRECTION, "bad-response", detail=str(exc), **fields)
        return
    sessions.save(stream.conn, material, peer_key)  # the peer's tickets arrived before its answer
    if not resp.ok:
        stream.close(time.monotonic() + 1.0)
        _reset(app)
        reason = {403: "remote-forbidden", 502: "remote-unavailable", 400: "remote-bad-request"}.get(
            resp.status, "remote-refused"
        )
        events.refused(DIRECTION, reason, status=resp.status, **fields)
        return
    relay = Relay(app, stream.conn, idle_timeout=rt.config.idle_timeout, to_plain=cp.leftover)
    result = rt.tunnels.run(DIRECTION, host, serial, target, relay, revoked=lambda: rt.policy.is_revoked(serial, host))
    events.finished(
        DIRECTION, result, source=source, setup=round(time.monotonic() - start - result.duration, 4), **fields
    )


_pool_lock = threading.Lock()


def _pool(rt: Runtime) -> MuxPool:
    with _pool_lock:
        if rt.mux_pool is None:
            rt.mux_pool = MuxPool()
        return rt.mux_pool


def _source_header(addr: object) -> str | None:
    if isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str) and isinstance(addr[1], int):
        return format_hostport(addr[0], addr[1])
    return None


class RouteHandler:
    """``--route LISTEN=NAME@HOST``: each accepted connection goes to service NAME on HOST."""

    def __init__(self, rt: Runtime, route: Route) -> None:
        self.rt = rt
        self.route = route

    def __call__(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        """Tunnel one application connection."""
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        open_tunnel(self.rt, conn, addr, self.route.host, self.route.service, via=f"route {self.route}")

    def fast(self, conn: socket.socket, addr: tuple[str, int]) -> bool:
        """The accept loop's non-blocking path (``--mux`` with a ready connection); see :func:`try_mux_stream`."""
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return try_mux_stream(self.rt, conn, addr, self.route.host, self.route.service, f"route {self.route}")


class TransparentHandler:
    """The transparent listener: the original destination picks the host (through the registry)."""

    def __init__(self, rt: Runtime, original_dst: Callable[[socket.socket], tuple[str, int]]) -> None:
        self.rt = rt
        self.original_dst = original_dst

    def __call__(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        """Tunnel one redirected connection to ``CONNECT ip:port`` on the host that owns ip."""
        try:
            ip, port = self.original_dst(conn)
        except (OSError, TapproofError) as exc:
            _reset(conn)
            events.refused(DIRECTION, "no-original-destination", detail=str(exc), via="transparent")
            return
        if is_own_address(ip):  # not redirected (a direct connection), or a loop back into ourselves
            _reset(conn)
            events.refused(DIRECTION, "own-address", destination=format_hostport(ip, port), via="transparent")
            return
        host = self.rt.registry.host_for_ip(ip)
        if host is None:
            _reset(conn)
            events.refused(DIRECTION, "not-a-fleet-host", destination=format_hostport(ip, port), via="transparent")
            return
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        open_tunnel(self.rt, conn, addr, host, format_hostport(ip, port), via="transparent")

    def fast(self, conn: socket.socket, addr: tuple[str, int]) -> bool:
        """The accept loop's non-blocking path: only a redirected connection a ready mux connection can carry."""
        if not self.rt.config.mux or self.rt.mux_pool is None:
            return False
        try:
            ip, port = self.original_dst(conn)
        except (OSError, TapproofError):
            return False  # the worker refuses it, with the reason
        host = None if is_own_address(ip) else self.rt.registry.host_for_ip(ip)
        if host is None:
            return False
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return try_mux_stream(self.rt, conn, addr, host, format_hostport(ip, port), "transparent")
