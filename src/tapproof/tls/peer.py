"""After the handshake: who is the peer? Chain verified by OpenSSL, the rest by ``pki.verify``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection

from cryptography import x509

from tapproof.errors import PeerReason, PeerRejected
from tapproof.identity import SpiffeID
from tapproof.pki.verify import Usage, check_leaf
from tapproof.tls.stream import TLSStream


def peer_leaf(stream: TLSStream) -> x509.Certificate | None:
    """The peer's verified leaf certificate, or None if it presented none."""
    cert = stream.conn.get_peer_certificate(as_cryptography=True)
    return cert


def check_peer(
    stream: TLSStream,
    *,
    trust_domain: str,
    now: dt.datetime,
    usage: Usage,
    revoked: Collection[str] = (),
    accept: Callable[[SpiffeID], bool] | None = None,
) -> SpiffeID:
    """Return the peer's SPIFFE ID or raise :class:`PeerRejected` (NO_CERTIFICATE if none).

    OpenSSL already verified the chain against the trust bundle during the
    handshake (a failure there aborts the handshake), so here the leaf gets
    tapproof's own checks.
    """
    cert = peer_leaf(stream)
    if cert is None:
        raise PeerRejected(PeerReason.NO_CERTIFICATE, "peer presented no certificate")
    return check_leaf(cert, trust_domain=trust_domain, now=now, usage=usage, revoked=revoked, accept=accept)
