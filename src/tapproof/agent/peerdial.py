"""Dialing a peer agent: the one path for classic tunnels and mux connections.

Connect with mutual TLS using the current credential generation's client
context, map a handshake refusal to its stable reason, then require the peer
to be exactly ``spiffe://TD/host/HOST`` (server usage, not expired, not
revoked) on every connection, resumed or not. :mod:`tapproof.agent.outbound`
and :mod:`tapproof.agent.muxpool` both dial through :func:`dial_peer`, so the
checks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cryptography import x509
from OpenSSL import SSL

from tapproof.agent import events
from tapproof.agent.credstore import Material, take_verify_error
from tapproof.agent.runtime import Runtime
from tapproof.errors import PeerRejected, TransportError
from tapproof.identity import host_id
from tapproof.pki.certs import serial_hex
from tapproof.tls.peer import check_peer, peer_leaf
from tapproof.tls.sessions import was_resumed
from tapproof.tls.stream import TLSStream, connect

__all__ = ["CONNECT_TIMEOUT", "DialRefused", "Dialed", "dial_peer"]

CONNECT_TIMEOUT = 10.0


class DialRefused(Exception):
    """A dial that did not give a verified peer: ``reason`` (stable, for the refusal line) and ``detail``.

    ``resumed`` is None when the handshake itself failed, else whether the
    refused connection was resumed.
    """

    def __init__(self, reason: str, detail: str, resumed: bool | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.resumed = resumed


@dataclasses.dataclass(frozen=True)
class Dialed:
    """A connection to a verified peer agent."""

    stream: TLSStream
    leaf: x509.Certificate | None
    serial: str
    resumed: bool


def dial_peer(
    rt: Runtime,
    host: str,
    addr: tuple[str, int],
    material: Material,
    prepare: Callable[[SSL.Connection], object],
) -> Dialed:
    """Connect to host ``host``'s agent at ``addr`` and check it is that host; raise :class:`DialRefused`.

    ``prepare`` runs on the TLS connection before the handshake (session
    offer, ALPN). A connection whose peer check fails is aborted.
    """
    expected = host_id(rt.trust_domain, host)
    if host in rt.policy.revoked_hosts:  # check_peer sees revoked serials only
        raise DialRefused("peer-revoked", f"host {host} is revoked")
    take_verify_error()
    try:
        stream = connect(addr, material.client_ctx, timeout=CONNECT_TIMEOUT, mark=rt.mark, prepare=prepare)
    except PeerRejected as exc:
        raise DialRefused(events.handshake_reason(exc, take_verify_error()), exc.detail) from None
    except TransportError as exc:
        raise DialRefused("connect-failed", str(exc)) from None
    resumed = was_resumed(stream.conn)
    try:
        # every connection, resumed or not: identity, expiry, revocation
        check_peer(
            stream,
            trust_domain=rt.trust_domain,
            now=rt.now(),
            usage="server",
            revoked=rt.policy.revoked_serials,
            accept=lambda s: s == expected,
        )
    except PeerRejected as exc:
        stream.abort()
        raise DialRefused(exc.reason.value, exc.detail, resumed) from None
    leaf = peer_leaf(stream)
    return Dialed(stream, leaf, serial_hex(leaf) if leaf is not None else "", resumed)
