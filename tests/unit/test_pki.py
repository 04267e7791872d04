"""CA, leaves, CSR checks and leaf checks, with real keys and certificates."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tapproof import identity
from tapproof.errors import ConfigError, CSRReason, CSRRejected, PeerReason, PeerRejected
from tapproof.pki import certs, csr, keys
from tapproof.pki.ca import CAPaths, load_ca
from tapproof.pki.verify import check_leaf, verify_chain
from tests.pkifix import host_creds, make_ca

NOW = dt.datetime.now(dt.UTC)


def test_init_writes_private_keys_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    p = CAPaths(tmp_path)
    for key in (p.root_key, p.int_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert len(ca.root_fingerprint) == 64
    before = p.root_cert.read_bytes()
    with pytest.raises(ConfigError, match="already holds a CA"):
        make_ca(tmp_path)
    assert p.root_cert.read_bytes() == before
    assert load_ca(tmp_path, "example.org").root_fingerprint == ca.root_fingerprint


def test_load_ca_corrupt(tmp_path: Path) -> None:
    make_ca(tmp_path)
    CAPaths(tmp_path).int_cert.write_text("garbage")
    with pytest.raises(ConfigError, match="corrupt CA"):
        load_ca(tmp_path, "example.org")


def test_leaf_shape(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    creds = host_creds(ca, "web-1")
    leaf = creds.leaf
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/host/web-1"]
    assert len(list(san)) == 1
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert not ku.key_cert_sign
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=1) <= life <= dt.timedelta(hours=1, minutes=6)  # 5 min backdate
    verify_chain(leaf, creds.chain[1:], [ca.root], NOW)
    assert check_leaf(leaf, trust_domain="example.org", now=NOW, usage="client").name == "web-1"


def test_other_ca_does_not_verify(tmp_path: Path) -> None:
    ca1, ca2 = make_ca(tmp_path / "a"), make_ca(tmp_path / "b")
    creds = host_creds(ca2, "x")
    with pytest.raises(PeerRejected) as ei:
        verify_chain(creds.leaf, creds.chain[1:], [ca1.root], NOW)
    assert ei.value.reason is PeerReason.UNTRUSTED


def test_name_constraints_bind_trust_domain(tmp_path: Path) -> None:
    """A CA of example.org cannot vouch for spiffe://evil.org/... (URI name constraint)."""
    ca = make_ca(tmp_path)
    sid = identity.SpiffeID("evil.org", "/host/x")
    key = keys.generate()
    leaf = certs.make_leaf(key.public_key(), sid, ca.intermediate_key, ca.intermediate, NOW, dt.timedelta(hours=1))
    with pytest.raises(PeerRejected):
        verify_chain(leaf, [ca.intermediate], [ca.root], NOW)


def test_csr_checks(tmp_path: Path) -> None:
    sid = identity.host_id("example.org", "web-1")
    key = keys.generate()
    assert csr.check(csr.build(key, None), sid) == key.public_key()
    assert csr.check(csr.build(key, sid), sid) == key.public_key()
    with pytest.raises(CSRRejected) as ei:
        csr.check(csr.build(key, identity.host_id("example.org", "other")), sid)
    assert ei.value.reason is CSRReason.IDENTITY_MISMATCH
    with pytest.raises(CSRRejected) as ei:
        csr.check(b"not a csr", sid)
    assert ei.value.reason is CSRReason.MALFORMED
    with pytest.raises(CSRRejected) as ei:
        csr.check(b"x" * 20000, sid)
    assert ei.value.reason is CSRReason.MALFORMED


@pytest.mark.parametrize(
    "weak",
    [
        lambda: rsa.generate_private_key(65537, 1024),
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ec.generate_private_key(ec.SECP192R1()),
    ],
)
def test_csr_weak_keys(weak) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    key = weak()
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CSRRejected) as ei:
        csr.check(req.public_bytes(serialization.Encoding.PEM), identity.host_id("example.org", "a"))
    assert ei.value.reason is CSRReason.WEAK_KEY


def test_csr_tampered_signature() -> None:
    from cryptography.hazmat.primitives import serialization

    key = keys.generate()
    der = bytearray(x509.load_pem_x509_csr(csr.build(key, None)).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + __import__("base64").encodebytes(bytes(der))
        + (b"-----END CERTIFICATE REQUEST-----\n")
    )
    with pytest.raises(CSRRejected) as ei:
        csr.check(pem, identity.host_id("example.org", "a"))
    assert ei.value.reason in (CSRReason.BAD_SIGNATURE, CSRReason.MALFORMED)


def _custom_leaf(ca, *, sans=None, ca_flag=False, eku=True, hash_alg=None, key=None, nb=None, na=None):  # type: ignore[no-untyped-def]
    key = key or keys.generate()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")]))
        .issuer_name(ca.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb or NOW - dt.timedelta(minutes=1))
        .not_valid_after(na or NOW + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, ca_flag, False, False, False), critical=True)
    )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(s) for s in sans]), False)
    cert = b.sign(ca.intermediate_key, hashes.SHA256())
    if isinstance(hash_alg, hashes.SHA1):
        # cryptography >= 47 refuses to sign SHA-1; re-sign the same TBS with OpenSSL via pyOpenSSL.
        import warnings

        from OpenSSL import crypto

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            legacy = crypto.X509.from_cryptography(cert)
            legacy.sign(crypto.PKey.from_cryptography_key(ca.intermediate_key), "sha1")
            cert = legacy.to_cryptography()
    return cert


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"sans": None}, PeerReason.BAD_SPIFFE_ID),
        ({"sans": []}, PeerReason.BAD_SPIFFE_ID),
        ({"sans": ["spiffe://example.org/host/a", "spiffe://example.org/host/b"]}, PeerReason.BAD_SPIFFE_ID),
        ({"sans": ["spiffe://example.org/host/a/../b"]}, PeerReason.BAD_SPIFFE_ID),
        ({"sans": ["spiffe://example.org/host/a%2Fb"]}, PeerReason.BAD_SPIFFE_ID),
        ({"sans": ["spiffe://EXAMPLE.org/host/a"]}, PeerReason.BAD_SPIFFE_ID),
        ({"sans": ["spiffe://example.org/host/a/"]}, PeerReason.BAD_SPIFFE_ID),
        ({"sans": ["spiffe://other.org/host/a"]}, PeerReason.WRONG_TRUST_DOMAIN),
        ({"sans": ["spiffe://example.org/host/a"], "ca_flag": True}, PeerReason.CA_AS_LEAF),
        ({"sans": ["spiffe://example.org/host/a"], "eku": False}, PeerReason.BAD_KEY_USAGE),
        ({"sans": ["spiffe://example.org/host/a"], "hash_alg": hashes.SHA1()}, PeerReason.WEAK_SIGNATURE),
        (
            {
                "sans": ["spiffe://example.org/host/a"],
                "na": NOW - dt.timedelta(minutes=1),
                "nb": NOW - dt.timedelta(hours=1),
            },
            PeerReason.EXPIRED,
        ),
        (
            {
                "sans": ["spiffe://example.org/host/a"],
                "nb": NOW + dt.timedelta(hours=1),
                "na": NOW + dt.timedelta(hours=2),
            },
            PeerReason.NOT_YET_VALID,
        ),
    ],
)
def test_check_leaf_reasons(tmp_path: Path, kwargs: dict[str, object], reason: PeerReason) -> None:
    ca = make_ca(tmp_path)
    leaf = _custom_leaf(ca, **kwargs)
    with pytest.raises(PeerRejected) as ei:
        check_leaf(leaf, trust_domain="example.org", now=NOW, usage="client")
    assert ei.value.reason is reason


def test_check_leaf_weak_rsa(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    leaf = _custom_leaf(ca, sans=["spiffe://example.org/host/a"], key=rsa.generate_private_key(65537, 1024))
    with pytest.raises(PeerRejected) as ei:
        check_leaf(leaf, trust_domain="example.org", now=NOW, usage="client")
    assert ei.value.reason is PeerReason.WEAK_KEY


def test_check_leaf_revoked_and_accept(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    leaf = host_creds(ca, "a").leaf
    with pytest.raises(PeerRejected) as ei:
        check_leaf(leaf, trust_domain="example.org", now=NOW, usage="client", revoked={certs.serial_hex(leaf)})
    assert ei.value.reason is PeerReason.REVOKED
    with pytest.raises(PeerRejected) as ei:
        check_leaf(
            leaf, trust_domain="example.org", now=NOW, usage="server", accept=lambda s: s.kind is identity.Kind.SERVER
        )
    assert ei.value.reason is PeerReason.WRONG_IDENTITY
