"""Checks on a peer's leaf certificate beyond what OpenSSL's chain verification does.

OpenSSL checks the chain to a root of the trust bundle, validity dates and
signatures during the handshake. :func:`check_leaf` then enforces what is
ours: exactly one exact SPIFFE ID in our trust domain, a leaf (not a CA),
the right key usages, no weak keys or SHA-1, not revoked. It raises
:class:`~tapproof.errors.PeerRejected` with a reason; it never returns a bool.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Sequence
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto

from tapproof import identity
from tapproof.errors import PeerReason, PeerRejected
from tapproof.pki.certs import serial_hex

Usage = Literal["client", "server"]
_WEAK_HASHES = (hashes.SHA1, hashes.MD5)
# What cryptography raises on a certificate it loaded but cannot fully read (not all are ValueError).
_PARSE_ERRORS = (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def spiffe_id_of(cert: x509.Certificate) -> identity.SpiffeID:
    """The single exact SPIFFE ID of a leaf; :class:`PeerRejected` (BAD_SPIFFE_ID) otherwise."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise PeerRejected(PeerReason.BAD_SPIFFE_ID, "certificate has no subjectAltName") from exc
    except _PARSE_ERRORS as exc:
        raise PeerRejected(PeerReason.BAD_SPIFFE_ID, "certificate extensions do not parse") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerRejected(PeerReason.BAD_SPIFFE_ID, f"certificate has {len(uris)} URI SANs, expected exactly 1")
    try:
        return identity.parse(uris[0])
    except identity.InvalidSpiffeID as exc:
        raise PeerRejected(PeerReason.BAD_SPIFFE_ID, str(exc)) from exc


def check_leaf(
    cert: x509.Certificate,
    *,
    trust_domain: str,
    now: dt.datetime,
    usage: Usage,
    revoked: Collection[str] = (),
    accept: Callable[[identity.SpiffeID], bool] | None = None,
) -> identity.SpiffeID:
    """Check a peer leaf; return its SPIFFE ID or raise :class:`PeerRejected`.

    ``usage`` is what the peer does in this handshake ("client" or "server");
    ``revoked`` holds revoked serials (lower-case hex); ``accept`` may refuse
    identities (e.g. "only the control-plane server") with WRONG_IDENTITY.
    """
    if now < cert.not_valid_before_utc:
        raise PeerRejected(PeerReason.NOT_YET_VALID, f"certificate not valid before {cert.not_valid_before_utc}")
    if now >= cert.not_valid_after_utc:
        raise PeerRejected(PeerReason.EXPIRED, f"certificate expired at {cert.not_valid_after_utc}")
    _check_leaf_extensions(cert, usage)
    _check_strength(cert)
    sid = spiffe_id_of(cert)
    if sid.trust_domain != trust_domain:
        raise PeerRejected(PeerReason.WRONG_TRUST_DOMAIN, f"{sid} is not in trust domain {trust_domain}")
    serial = serial_hex(cert)
    if serial in revoked:
        raise PeerRejected(PeerReason.REVOKED, f"certificate {serial} of {sid} is revoked")
    if accept is not None and not accept(sid):
        raise PeerRejected(PeerReason.WRONG_IDENTITY, f"{sid} is not accepted here")
    return sid


def _check_leaf_extensions(cert: x509.Certificate, usage: Usage) -> None:
    try:
        exts = cert.extensions
    except _PARSE_ERRORS as exc:
        raise PeerRejected(PeerReason.BAD_KEY_USAGE, "certificate extensions do not parse") from exc
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise PeerRejected(PeerReason.CA_AS_LEAF, "a CA certificate was presented as a leaf")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise PeerRejected(PeerReason.BAD_KEY_USAGE, "certificate has no keyUsage") from exc
    if not ku.digital_signature or ku.key_cert_sign:
        raise PeerRejected(PeerReason.BAD_KEY_USAGE, "keyUsage must be digitalSignature only")
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise PeerRejected(PeerReason.BAD_KEY_USAGE, "certificate has no extendedKeyUsage") from exc
    needed = ExtendedKeyUsageOID.CLIENT_AUTH if usage == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    if needed not in eku:
        raise PeerRejected(PeerReason.BAD_KEY_USAGE, f"extendedKeyUsage lacks {usage}Auth")


def _check_strength(cert: x509.Certificate) -> None:
    try:
        algo = cert.signature_hash_algorithm
    except _PARSE_ERRORS as exc:  # an algorithm this build cannot name: refused, not a crash (found by fuzz/)
        raise PeerRejected(PeerReason.WEAK_SIGNATURE, f"unsupported signature algorithm: {exc}") from exc
    if isinstance(algo, _WEAK_HASHES):
        raise PeerRejected(PeerReason.WEAK_SIGNATURE, f"certificate signed with {algo.name}")
    try:
        key = cert.public_key()
    except _PARSE_ERRORS as exc:
        raise PeerRejected(PeerReason.WEAK_KEY, f"public key does not load: {exc}") from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PeerRejected(PeerReason.WEAK_KEY, f"RSA-{key.key_size} key")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < 256:
            raise PeerRejected(PeerReason.WEAK_KEY, f"{key.curve.name} key")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise PeerRejected(PeerReason.WEAK_KEY, f"unsupported key type {type(key).__name__}")


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> None:
    """Verify ``leaf`` up to one of ``roots`` with OpenSSL at time ``now``; raise UNTRUSTED otherwise.

    Used where no handshake verified the chain already: pinned-root bootstrap
    during enrollment, and tests.
    """
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    store.set_time(now.replace(tzinfo=None))
    ctx = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        chain=[crypto.X509.from_cryptography(c) for c in intermediates],
    )
    try:
        ctx.verify_certificate()
    except crypto.X509StoreContextError as exc:
        raise PeerRejected(PeerReason.UNTRUSTED, f"chain does not verify: {exc}") from exc
