"""Building certificates: root CA, intermediate CA, SPIFFE leaf certificates.

Every leaf has exactly one URI SAN (its SPIFFE ID), ``CA:FALSE``, key usage
``digitalSignature`` and both ``serverAuth`` and ``clientAuth`` (every
tapproof link is mutual TLS, and an agent is client and server). Serial
numbers are 159 random bits, so servers that share a database never collide
(the store also refuses a duplicate).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tapproof.errors import PKIError
from tapproof.identity import SpiffeID
from tapproof.pki.keys import PrivateKey, signing_hash

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
# Backdate notBefore a little so peers with slightly slow clocks accept new certificates.
BACKDATE = dt.timedelta(minutes=5)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, 64 lower-case hex characters."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_hex(cert: x509.Certificate) -> str:
    """The serial number as lower-case hex (how the store and logs name certificates)."""
    return format(cert.serial_number, "x")


def to_pem(certs: x509.Certificate | Sequence[x509.Certificate]) -> bytes:
    """PEM of one certificate or a chain."""
    seq = [certs] if isinstance(certs, x509.Certificate) else list(certs)
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in seq)


def load_pem_chain(data: bytes, *, what: str = "certificate") -> list[x509.Certificate]:
    """Parse one or more PEM certificates; raise :class:`PKIError` on garbage or nothing."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PKIError(f"{what}: not a valid PEM certificate") from exc
    if not certs:
        raise PKIError(f"{what}: no certificate found")
    return certs


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    return builder.sign(key, cast("Any", signing_hash(key)))


def _name(cn: str, td: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"tapproof {td}"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _public(key: PrivateKey) -> PublicKey:
    return key.public_key()


def make_root(key: PrivateKey, trust_domain: str, now: dt.datetime, lifetime: dt.timedelta) -> x509.Certificate:
    """Self-signed root CA for ``trust_domain`` (path length 1: one intermediate below it)."""
    # a random tag: two roots made in one second (a quick rotation) still get distinct names
    name = _name(f"tapproof root CA {now:%Y-%m-%d %H:%M:%S} {secrets.token_hex(3)}", trust_domain)
    ski = x509.SubjectKeyIdentifier.from_public_key(_public(key))
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_public(key))
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(_name_constraints(trust_domain), critical=True)
    )
    return _sign(builder, key)


def make_intermediate(
    key: PrivateKey | PublicKey,
    root_key: PrivateKey,
    root: x509.Certificate,
    trust_domain: str,
    label: str,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.Certificate:
    """An intermediate signing CA under ``root`` (path length 0), never outliving the root.

    ``key`` may be the intermediate's public key alone (signing another server's request).
    """
    public = key if isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) else _public(key)
    not_after = min(now + lifetime, root.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"tapproof intermediate CA {label}", trust_domain))
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_aki(root), critical=False)
        .add_extension(_name_constraints(trust_domain), critical=True)
    )
    return _sign(builder, root_key)


def make_leaf(
    public_key: PublicKey,
    spiffe_id: SpiffeID,
    issuer_key: PrivateKey,
    issuer: x509.Certificate,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.Certificate:
    """A SPIFFE leaf certificate: one URI SAN, client+server auth, never outliving its issuer."""
    not_after = min(now + lifetime, issuer.not_valid_after_utc)
    if not_after <= now:
        raise PKIError("the intermediate CA has expired: rotate it before issuing")
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"tapproof {spiffe_id.trust_domain}")]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    return _sign(builder, issuer_key)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _name_constraints(trust_domain: str) -> x509.NameConstraints:
    # RFC 5280 URI constraints match the URI's host; for spiffe://TD/... that is the
    # trust domain, so a CA of this trust domain cannot vouch for another one.
    return x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)], excluded_subtrees=None
    )
