"""The control-plane API's TLS: a client certificate is REQUIRED on every connection.

Two kinds of client certificate pass the handshake:

* an identity: a chain to the trust bundle (hosts, the admin, other servers),
  then checked by :func:`tapproof.tls.peer.check_peer` (SPIFFE ID, usages,
  strength, revocation);
* a *bootstrap* certificate: self-signed, made by an enrolling agent for the
  key of its CSR (:func:`bootstrap_certificate`). The TLS 1.3
  CertificateVerify proves the client holds that key. A bootstrap peer may
  only call the public routes (``/v1/enroll``, ``/v1/bundle``) and may only
  enroll a CSR for that same key, so a join token is redeemed only by the
  party that ran this TLS session.

A third kind passes only when the server runs with a renewal grace
(``--renew-grace``, default 24h): an identity whose *leaf* has expired (every
other certificate of the chain valid). Such a peer is marked ``expired``: it
may call ``POST /v1/renew`` only, within the grace, and the control plane
checks it is unrevoked and the host's latest certificate
(:meth:`tapproof.control.service.ControlPlane.renew`). An agent whose
certificate ran out while the control plane was unreachable (or while
everything was frozen) so recovers with no manual step.

Anything else (no certificate, an empty certificate message, a chain that
does not verify) fails the handshake. The verify callback accepts exactly
two OpenSSL errors: "self-signed certificate" at depth 0 (raised only when the
chain is that one certificate) and, with a grace, "certificate has expired"
at depth 0; every other error is OpenSSL's verdict. The first error of each
handshake is remembered per thread, for the refusal reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import weakref
from collections.abc import Collection
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from tapproof import identity
from tapproof.errors import PeerReason, PeerRejected
from tapproof.pki import certs
from tapproof.pki.keys import PrivateKey, signing_hash
from tapproof.tls import context, unsafe
from tapproof.tls.credentials import Credentials, TrustBundle
from tapproof.tls.peer import check_peer
from tapproof.tls.reasons import verify_reason
from tapproof.tls.stream import TLSStream

__all__ = [
    "BOOTSTRAP_CN",
    "APIPeer",
    "api_server_context",
    "authenticate",
    "bootstrap_certificate",
    "bootstrap_client_context",
    "handshake_reason",
    "key_der",
    "take_verify_error",
]

BOOTSTRAP_CN = "tapproof enrollment bootstrap"
_SELF_SIGNED_LEAF = 18  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
_EXPIRED_CERT = 10  # X509_V_ERR_CERT_HAS_EXPIRED
_BOOTSTRAP_VALIDITY = dt.timedelta(days=1)  # either side: the handshake, not the dates, proves freshness
_BOOTSTRAP_CURVES = (ec.SECP256R1, ec.SECP384R1)

_verify = threading.local()
_BOOTSTRAP: weakref.WeakSet[SSL.Connection] = weakref.WeakSet()  # handshakes passed on a bootstrap certificate
_EXPIRED: weakref.WeakSet[SSL.Connection] = weakref.WeakSet()  # handshakes passed on an expired leaf (grace)


def _remember(errno: int) -> None:
    if getattr(_verify, "errno", 0) == 0:
        _verify.errno = errno


def take_verify_error() -> int:
    """The first OpenSSL verify error of this thread's last handshake (0: none), then cleared."""
    errno = int(getattr(_verify, "errno", 0))
    _verify.errno = 0
    return errno


def _callback(conn: SSL.Connection, _cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    if ok:
        return True
    if errno == _SELF_SIGNED_LEAF and depth == 0:  # OpenSSL: the chain is one self-signed certificate
        _BOOTSTRAP.add(conn)
        return True  # a bootstrap certificate: judged after the handshake (authenticate)
    _remember(errno)
    return False


def _callback_grace(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    if not ok and errno == _EXPIRED_CERT and depth == 0:
        _EXPIRED.add(conn)
        return True  # an expired leaf: judged after the handshake (authenticate: grace, /v1/renew only)
    return _callback(conn, cert, errno, depth, ok)


def api_server_context(
    creds: Credentials, bundle: TrustBundle, *, unsafe_classical_groups: bool = False, renew_grace: bool = False
) -> SSL.Context:
    """The API server's context: TLS 1.3, X25519MLKEM768, a client certificate required.

    ``renew_grace``: let an identity whose leaf has expired finish the handshake
    (:func:`authenticate` then applies the grace and marks the peer ``expired``).
    """
    ctx = context.server_context(creds, bundle, require_client_cert=True)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _callback_grace if renew_grace else _callback)
    if unsafe_classical_groups:
        unsafe.allow_classical_groups(ctx)
    return ctx


def handshake_reason(exc: PeerRejected, verify_errno: int) -> str:
    """A short, stable reason for a refused handshake (for the log line and the metric)."""
    if verify_errno:
        return verify_reason(verify_errno)
    if exc.reason is not PeerReason.HANDSHAKE_FAILED:
        return str(exc.reason.value)
    detail = exc.detail.lower()
    if "did not return a certificate" in detail:
        return "no-certificate"
    if "unsupported protocol" in detail or "version too low" in detail:
        return "not-tls13"
    if "key share" in detail or "shared group" in detail:
        return "not-post-quantum"
    if "wrong version number" in detail or "http request" in detail or "record layer" in detail:
        return "not-tls"
    if "certificate" in detail:
        return "untrusted"
    if "eof" in detail or "reset" in detail or "unexpected" in detail:
        return "handshake-aborted"
    return "handshake-failed"


def key_der(key: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a public key (how keys are compared)."""
    return cast("bytes", key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


@dataclasses.dataclass(frozen=True)
class APIPeer:
    """Who is on the other end of an API connection."""

    spiffe_id: identity.SpiffeID | None  # None: a bootstrap certificate (public routes only)
    key: bytes  # SPKI DER of the certificate's key (proof of possession: the TLS handshake)
    serial: str  # the certificate's serial (hex)
    expired: bool = False  # an expired leaf within the renewal grace: POST /v1/renew only

    @property
    def bootstrap(self) -> bool:
        """True for an enrolling client with a self-signed bootstrap certificate."""
        return self.spiffe_id is None


def authenticate(
    stream: TLSStream,
    *,
    trust_domain: str,
    now: dt.datetime,
    revoked: Collection[str],
    grace: dt.timedelta = dt.timedelta(0),
) -> APIPeer:
    """The peer after a completed handshake, or :class:`PeerRejected` (fail closed).

    Run at the handshake and before every request on a keep-alive connection.
    A leaf that expired less than ``grace`` ago passes every other check as of
    its expiry and comes back marked ``expired`` (the caller restricts it to
    renewal); past the grace it is refused with reason ``expired``.
    """
    leaf = stream.conn.get_peer_certificate(as_cryptography=True)
    if leaf is None:  # the context requires one; belt and braces
        raise PeerRejected(PeerReason.NO_CERTIFICATE, "peer presented no certificate")
    expired = stream.conn in _EXPIRED or leaf.not_valid_after_utc <= now
    if stream.conn in _BOOTSTRAP:
        if expired:
            raise PeerRejected(PeerReason.EXPIRED, "bootstrap certificate has expired")
        _check_bootstrap(leaf)
        return APIPeer(None, key_der(leaf.public_key()), certs.serial_hex(leaf))
    if expired:
        late = now - leaf.not_valid_after_utc
        if late > grace:
            raise PeerRejected(
                PeerReason.EXPIRED, f"certificate expired {int(late.total_seconds())} s ago (renewal grace {grace})"
            )
        at = min(now, leaf.not_valid_after_utc - dt.timedelta(seconds=1))  # every other check: as of its last second
        sid = check_peer(stream, trust_domain=trust_domain, now=at, usage="client", revoked=revoked)
        return APIPeer(sid, key_der(leaf.public_key()), certs.serial_hex(leaf), expired=True)
    sid = check_peer(stream, trust_domain=trust_domain, now=now, usage="client", revoked=revoked)
    return APIPeer(sid, key_der(leaf.public_key()), certs.serial_hex(leaf))


def _check_bootstrap(cert: x509.Certificate) -> None:
    """A bootstrap certificate must really be self-signed, with a key we would sign a CSR for."""
    if cert.issuer != cert.subject:
        raise PeerRejected(PeerReason.UNTRUSTED, "bootstrap certificate is not self-issued")
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _BOOTSTRAP_CURVES):
            raise PeerRejected(PeerReason.WEAK_KEY, f"bootstrap certificate key on {key.curve.name}")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise PeerRejected(PeerReason.WEAK_KEY, f"bootstrap certificate with a {type(key).__name__.lstrip('_')}")
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise PeerRejected(PeerReason.UNTRUSTED, "bootstrap certificate's self-signature does not verify") from exc


def bootstrap_certificate(key: PrivateKey, now: dt.datetime | None = None) -> x509.Certificate:
    """A self-signed certificate for ``key`` (no extensions: OpenSSL then treats it as self-signed)."""
    now = now or dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BOOTSTRAP_CN)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BOOTSTRAP_VALIDITY)
        .not_valid_after(now + _BOOTSTRAP_VALIDITY)
    )
    return builder.sign(key, cast("Any", signing_hash(key)))


def bootstrap_client_context(key: PrivateKey) -> SSL.Context:
    """The enrolling client's context: pinned-root server check (``tls.pinning``, after the
    handshake) and a bootstrap certificate for ``key``, the key of the CSR it will send."""
    ctx = context.pinning_client_context()
    ctx.use_certificate(bootstrap_certificate(key))
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    return ctx
