"""Enrollment bootstrap: trust a server whose chain ends at a root with a pinned fingerprint.

A new agent has no trust bundle yet; its join string carries the SHA-256
fingerprint of the root CA and the trust domain. The server sends its full
chain (leaf, intermediate, root). Before sending anything (the join secret
least of all), the agent finds the pinned root in that chain, verifies the
chain to it with OpenSSL (the root's URI name constraint binds the trust
domain), and checks that the leaf is ``spiffe://TD/tapproof/server``. Any
mismatch: refuse, send nothing, write nothing.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from tapproof import identity
from tapproof.errors import PeerReason, PeerRejected
from tapproof.pki import certs
from tapproof.pki.verify import check_leaf, verify_chain
from tapproof.tls.stream import TLSStream


def verify_pinned(stream: TLSStream, fingerprint: str, trust_domain: str, now: dt.datetime) -> x509.Certificate:
    """Check the server chain against the pinned root; return that root.

    Raises :class:`PeerRejected` with FINGERPRINT_MISMATCH, UNTRUSTED,
    WRONG_TRUST_DOMAIN or WRONG_IDENTITY.
    """
    chain = stream.conn.get_peer_cert_chain(as_cryptography=True) or []
    if not chain:
        raise PeerRejected(PeerReason.NO_CERTIFICATE, "server presented no certificate")
    roots = [c for c in chain if certs.fingerprint(c) == fingerprint]
    if not roots:
        raise PeerRejected(
            PeerReason.FINGERPRINT_MISMATCH,
            "the server's root CA does not match the fingerprint in the join string",
        )
    root = roots[0]
    leaf = chain[0]
    intermediates = [c for c in chain[1:] if certs.fingerprint(c) != fingerprint]
    verify_chain(leaf, intermediates, [root], now)
    check_leaf(
        leaf,
        trust_domain=trust_domain,
        now=now,
        usage="server",
        accept=lambda s: s.kind is identity.Kind.SERVER,
    )
    return root
