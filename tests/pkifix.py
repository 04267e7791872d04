"""Test PKI: a CA in a temp dir and leaves made with it (real keys, real certificates)."""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

from tapproof import identity
from tapproof.pki.ca import LocalCA, init_ca
from tapproof.tls.credentials import Credentials

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def make_ca(tmp: Path, td: str = "example.org", now: dt.datetime | None = None) -> LocalCA:
    """A fresh root + intermediate in ``tmp``."""
    return init_ca(tmp, td, now or dt.datetime.now(dt.UTC))


def host_creds(ca: LocalCA, name: str, now: dt.datetime | None = None, hours: float = 1.0) -> Credentials:
    """Credentials for ``spiffe://TD/host/NAME``."""
    return ca.credentials_for(
        identity.host_id(ca.trust_domain, name), now or dt.datetime.now(dt.UTC), dt.timedelta(hours=hours)
    )


def craft_leaf(
    ca: LocalCA,
    uris: Sequence[str] | None = None,
    *,
    name: str = "mallory",
    key: Any = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_usage: x509.KeyUsage | bool | None = True,
    eku: Sequence[x509.ObjectIdentifier] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    is_ca: bool = False,
    weak_hash: str | None = None,
) -> Credentials:
    """A leaf signed by ``ca``'s intermediate, with every field under the test's control.

    Defaults make a valid host leaf (``spiffe://TD/host/NAME``, 1 h, digitalSignature,
    server+client auth, ECDSA P-256, SHA-256); each argument breaks one thing:
    ``uris`` (any URI SANs, exact strings), ``key`` (e.g. RSA-1024), the dates,
    ``key_usage`` (an explicit KeyUsage, True for the default, None for none), ``eku``
    (None for none), ``is_ca`` (CA:TRUE with keyCertSign), ``weak_hash`` (e.g. ``"sha1"``: re-signed through
    pyOpenSSL, since ``cryptography`` refuses to sign with SHA-1).
    """
    now = dt.datetime.now(dt.UTC)
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    uris = list(uris) if uris is not None else [str(identity.host_id(ca.trust_domain, name))]
    if key_usage is True:
        key_usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=is_ca,
            crl_sign=is_ca,
            encipher_only=False,
            decipher_only=False,
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"tapproof {ca.trust_domain}")]))
        .issuer_name(ca.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.intermediate_key.public_key()), critical=False
        )
    )
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=True)
    if isinstance(key_usage, x509.KeyUsage):
        builder = builder.add_extension(key_usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    cert = builder.sign(ca.intermediate_key, hashes.SHA256())
    if weak_hash:
        x = crypto.X509.from_cryptography(cert)
        with warnings.catch_warnings():  # X509.sign is deprecated; it is the one way left to sign with SHA-1
            warnings.simplefilter("ignore", DeprecationWarning)
            x.sign(crypto.PKey.from_cryptography_key(ca.intermediate_key), weak_hash)
        cert = x.to_cryptography()
    return Credentials(key, (cert, ca.intermediate))
