"""The short form of ``make fuzz``: every fuzz target for a couple of seconds on each run of the suite."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzz.runner import run
from fuzz.targets import TARGETS


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_short(name: str) -> None:
    factory, seeds = TARGETS[name]
    logging.disable(logging.CRITICAL)
    try:
        # a fixed count (not a rate): every input must be handled; the time cap only bounds a stuck target
        assert run(factory(), seeds, seconds=60.0, runs=300, seed=1) == 300
    finally:
        logging.disable(logging.NOTSET)


# --- regressions: crashes the fuzzer found, each now a refusal -------------------------------------
def _csr_der(sid: str | None = "spiffe://example.org/host/web-1") -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509 import load_pem_x509_csr

    from tapproof import identity
    from tapproof.pki import csr, keys

    pem = csr.build(keys.generate("ecdsa-p256"), identity.parse(sid) if sid else None)
    return load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> bytes:
    import base64

    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE REQUEST-----\n"


EC_PUBLIC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")  # 1.2.840.10045.2.1
ECDSA_SHA256_OID = bytes.fromhex("06082a8648ce3d040302")  # 1.2.840.10045.4.3.2


@pytest.mark.parametrize(
    ("case", "edit"),
    [
        # cryptography raised UnsupportedAlgorithm (not ValueError) for an unknown key type: the enrollment
        # API, which is public, answered 500 with a traceback
        ("unknown key type", lambda der: der.replace(EC_PUBLIC_KEY_OID, bytes.fromhex("06072a8648ce3d0001"), 1)),
        # ... and InvalidVersion for a CSR version other than 1
        ("CSR version 8", lambda der: der.replace(b"\x02\x01\x00", b"\x02\x01\x08", 1)),
    ],
)
def test_fuzz_regression_csr_refused_not_crashed(case: str, edit: Callable[[bytes], bytes]) -> None:
    from tapproof import identity
    from tapproof.errors import CSRRejected
    from tapproof.pki import csr

    der = _csr_der()
    bad = edit(der)
    assert bad != der, case
    with pytest.raises(CSRRejected):
        csr.check(_pem(bad), identity.host_id("example.org", "web-1"))
    with pytest.raises(CSRRejected):
        csr.public_key_der(_pem(bad))


def _leaf_der(tmp: Path) -> bytes:
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from tests.pkifix import host_creds, make_ca

    return host_creds(make_ca(tmp), "web-1", dt.datetime.now(dt.UTC)).leaf.public_bytes(serialization.Encoding.DER)


def _bad_point(der: bytes) -> bytes:
    """Move the leaf's EC point off the curve (last byte of Y)."""
    i = der.index(EC_PUBLIC_KEY_OID)
    j = der.index(b"\x03\x42\x00\x04", i) + 4 + 63
    return der[:j] + bytes([der[j] ^ 0x01]) + der[j + 1 :]


@pytest.mark.parametrize(
    ("case", "edit"),
    [
        # cert.public_key() raised ValueError("Invalid key") out of check_leaf: a handler crash, not a refusal
        ("key off the curve", _bad_point),
        # signature_hash_algorithm raised UnsupportedAlgorithm for an unknown signature algorithm
        ("unknown signature algorithm", lambda der: der.replace(ECDSA_SHA256_OID, ECDSA_SHA256_OID[:-1] + b"\x09")),
    ],
)
def test_fuzz_regression_peer_leaf_refused_not_crashed(
    tmp_path: Path, case: str, edit: Callable[[bytes], bytes]
) -> None:
    import datetime as dt

    from cryptography import x509

    from tapproof.errors import PeerRejected
    from tapproof.pki.verify import check_leaf

    der = _leaf_der(tmp_path)
    bad = edit(der)
    assert bad != der, case
    cert = x509.load_der_x509_certificate(bad)
    with pytest.raises(PeerRejected):
        check_leaf(cert, trust_domain="example.org", now=dt.datetime.now(dt.UTC), usage="client")
