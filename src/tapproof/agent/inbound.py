"""The tunnel port: mutual TLS, peer check, CONNECT preamble, policy, then the relay to a local service.

Order of checks (fail closed; no byte reaches a service before all pass):

1. TLS 1.3 handshake with X25519MLKEM768 within :data:`HANDSHAKE_TIMEOUT`,
   client certificate chained to our bundle (OpenSSL); or a resumption of a
   ticket this agent issued under its current certificate and bundle
   (psk_dhe_ke: still a fresh X25519MLKEM768 exchange; see ``tls.context``);
2. the peer is a ``spiffe://TD/host/NAME`` leaf, not expired, not a revoked
   serial, and NAME is not a revoked host (on resumed handshakes too: the
   leaf comes from the ticket's session);
3. one ``CONNECT`` preamble within :data:`PREAMBLE_TIMEOUT` (else ``400``);
4. policy on (peer, service name, port): ``403`` if denied. The policy runs
   BEFORE the existence check, so a denied peer cannot probe which services
   exist: it always gets ``403``;
5. the target: a service this agent fronts, else ``502`` (reason
   ``unknown-service``); in transparent mode ``ip:port`` where ip is one of this
   host's own addresses, mapped to the fronted service on that port or to
   ``port-N``; connect within :data:`SERVICE_CONNECT_TIMEOUT`, else ``502``
   (``service-unreachable``);
6. ``200``, then the relay (the peer's pipelined bytes are delivered first).

A client that negotiated ALPN ``tapproof-mux/1`` (same handshake, same peer
check) gets :mod:`tapproof.agent.muxserve` instead of steps 3-6: every stream
OPEN goes through steps 4-5 (:func:`check_target`) after a fresh revocation
and expiry check of the connection's peer.

Handshake failures are refused without a word (an RST); refusals after the
handshake get one opaque status line. The local log gets the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import socket
import time

from tapproof.agent import events, muxserve
from tapproof.agent.config import Service
from tapproof.agent.credstore import take_verify_error
from tapproof.agent.metrics import HANDSHAKE_SECONDS, HANDSHAKES
from tapproof.agent.runtime import Runtime
from tapproof.errors import (
    HandshakeTimeout,
    PeerReason,
    PeerRejected,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
)
from tapproof.identity import Kind, SpiffeID
from tapproof.pki.certs import serial_hex
from tapproof.tls.context import MUX_ALPN
from tapproof.tls.peer import check_peer, peer_leaf
from tapproof.tls.sessions import was_resumed
from tapproof.tls.stream import TLSStream, set_liveness
from tapproof.tunnel import preamble
from tapproof.tunnel.relay import Relay
from tapproof.units import format_hostport

log = logging.getLogger(__name__)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "PREAMBLE_TIMEOUT",
    "SERVICE_CONNECT_TIMEOUT",
    "InboundHandler",
    "Verdict",
    "check_target",
    "is_own_address",
]

HANDSHAKE_TIMEOUT = 10.0
PREAMBLE_TIMEOUT = 10.0
SERVICE_CONNECT_TIMEOUT = 5.0
DIRECTION = "inbound"


def is_own_address(ip: str) -> bool:
    """True if ``ip`` is loopback or an address of this host (a bind test; never unspecified/multicast)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    if addr.is_unspecified or addr.is_multicast or (addr.version == 4 and str(addr) == "255.255.255.255"):
        return False
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(addr), 0))
        except OSError:
            return False
    return True


def connect_service(svc: Service | None, port_target: tuple[str, int] | None) -> socket.socket:
    """Connect to a fronted service (TCP or unix) or to ``port_target``; OSError if unreachable."""
    if svc is not None and svc.unix_path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(SERVICE_CONNECT_TIMEOUT)
            sock.connect(svc.unix_path)
        except OSError:
            sock.close()
            raise
    else:
        addr = (svc.host, svc.port) if svc is not None else port_target
        assert addr is not None  # noqa: S101 - the caller gives one of the two
        sock = socket.create_connection(addr, timeout=SERVICE_CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


class InboundHandler:
    """Handles one accepted tunnel connection (called in its own worker thread)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def __call__(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        """Serve one connection from accept to relay end; owns ``conn``."""
        rt = self.rt
        source = format_hostport(addr[0], addr[1])
        start = time.monotonic()
        material = rt.creds.current
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_liveness(conn)  # a silent partition ends the tunnel within USER_TIMEOUT
        stream = TLSStream.server(material.server_ctx, conn)
        take_verify_error()
        try:
            stream.handshake(start + HANDSHAKE_TIMEOUT)
            peer = check_peer(
                stream, trust_domain=rt.trust_domain, now=rt.now(), usage="client", revoked=rt.policy.revoked_serials
            )
            if peer.kind is not Kind.HOST:
                raise PeerRejected(PeerReason.WRONG_IDENTITY, f"{peer} is not a host identity")
            if peer.name in rt.policy.revoked_hosts:
                raise PeerRejected(PeerReason.REVOKED, f"host {peer.name} is revoked")
            leaf = peer_leaf(stream)
            serial = serial_hex(leaf) if leaf is not None else ""
        except PeerRejected as exc:
            stream.abort()
            reason = events.handshake_reason(exc, take_verify_error())
            events.refused(DIRECTION, reason, source=source, detail=exc.detail, resumed=was_resumed(stream.conn))
            return
        except HandshakeTimeout:
            stream.abort()
            events.refused(DIRECTION, "handshake-timeout", source=source)
            return
        except TransportError as exc:
            stream.abort()
            events.refused(DIRECTION, "handshake-aborted", source=source, detail=str(exc))
            return
        HANDSHAKE_SECONDS.labels(DIRECTION).observe(time.monotonic() - start)
        HANDSHAKES.labels(DIRECTION, "resumed" if was_resumed(stream.conn) else "full").inc()
        if stream.conn.get_alpn_proto_negotiated() == MUX_ALPN:
            not_after = leaf.not_valid_after_utc if leaf is not None else rt.now()
            muxserve.serve(rt, stream, peer, serial, not_after, material, source, check_target)
            return
        self._after_handshake(stream, peer, serial, source, start)

    def _after_handshake(self, stream: TLSStream, peer: SpiffeID, serial: str, source: str, start: float) -> None:
        rt = self.rt
        fields: dict[str, object] = {
            "peer": str(peer),
            "source": source,
            "group": stream.group,
            "resumed": was_resumed(stream.conn),
        }
        pre = preamble.ServerPreamble()
        deadline = time.monotonic() + PREAMBLE_TIMEOUT
        try:
            req = None
            while req is None:
                data = stream.recv(16384, deadline)
                if not data:
                    pre.feed_eof()
                req = pre.feed(data)
        except RemoteProtocolError as exc:
            with contextlib.suppress(TransportError, ProtocolError):
                stream.sendall(pre.respond(400), deadline)
            stream.close(time.monotonic() + 1.0)
            events.refused(DIRECTION, "bad-preamble", detail=str(exc), **fields)
            return
        except TransportError as exc:
            stream.abort()
            events.refused(DIRECTION, "preamble-timeout", detail=str(exc), **fields)
            return

        target = req.target
        fields.update(request_id=req.request_id, app_source=req.source)

        def refuse(status: int, reason: str, **extra: object) -> None:
            with contextlib.suppress(TransportError, ProtocolError):
                stream.sendall(pre.respond(status), time.monotonic() + 2.0)
            stream.close(time.monotonic() + 1.0)
            events.refused(DIRECTION, reason, status=status, **fields, **extra)

        verdict = check_target(rt, peer, target)
        fields.update(service=verdict.name, target=str(target))
        if verdict.refusal is not None:
            status, reason, extra = verdict.refusal
            refuse(status, reason, **extra)
            return
        name = verdict.name
        try:
            service_sock = connect_service(verdict.svc, verdict.port_target)
        except OSError as exc:
            refuse(502, "service-unreachable", detail=exc.strerror or str(exc))
            return
        try:
            stream.sendall(pre.respond(200), time.monotonic() + PREAMBLE_TIMEOUT)
        except TransportError as exc:
            stream.abort()
            service_sock.close()
            events.refused(DIRECTION, "peer-gone", detail=str(exc), **fields)
            return
        relay = Relay(service_sock, stream.conn, idle_timeout=rt.config.idle_timeout, to_plain=pre.leftover)
        result = rt.tunnels.run(
            DIRECTION, peer.name, serial, name, relay, revoked=lambda: rt.policy.is_revoked(serial, peer.name)
        )
        events.finished(DIRECTION, result, setup=round(time.monotonic() - start - result.duration, 4), **fields)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The checks' answer for one CONNECT/OPEN: a refusal (status, reason, log fields), or what to connect."""

    name: str
    refusal: tuple[int, str, dict[str, object]] | None = None
    svc: Service | None = None
    port_target: tuple[str, int] | None = None


def check_target(rt: Runtime, peer: SpiffeID, target: preamble.Target) -> Verdict:
    """Steps 4-5 of the module doc for one target (address rules, policy BEFORE existence); no I/O but a bind test.

    Shared by the classic path and every mux OPEN, so both refuse the same way with the same reasons.
    """
    cfg = rt.config
    svc: Service | None = None
    port: int | None = None
    if target.kind is preamble.Kind.SERVICE:
        name = target.name
        svc = cfg.service(name)
    else:
        port = target.port
        name = next((s.name for s in cfg.services if s.port == port and not s.unix_path), f"port-{port}")

    def refuse(status: int, reason: str, **extra: object) -> Verdict:
        return Verdict(name, (status, reason, extra))

    if target.kind is preamble.Kind.ADDRESS:
        if not cfg.transparent:
            return refuse(403, "address-target-disabled")
        if not is_own_address(target.host) or port in rt.own_ports():
            return refuse(403, "not-own-address")
        if ipaddress.ip_address(target.host).is_loopback:
            return refuse(403, "loopback-target")  # what listens on loopback only was never reachable from the network
        if port not in cfg.protected_port_set():
            # only ports this agent fronts (--service, --protected-port): never an arbitrary local port
            return refuse(403, "port-not-protected")
    decision = rt.policy.decide(peer, name, port)
    if not decision.allowed:
        return refuse(403, "policy-denied", rule=decision.rule_id, policy_reason=decision.reason)
    if target.kind is preamble.Kind.SERVICE and svc is None:
        return refuse(502, "unknown-service")
    port_target: tuple[str, int] | None = None
    if target.kind is preamble.Kind.ADDRESS:
        svc = next((s for s in cfg.services if s.port == port and not s.unix_path), None)
        if svc is None:
            port_target = ("127.0.0.1", target.port)
    return Verdict(name, None, svc, port_target)
