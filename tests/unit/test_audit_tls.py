"""TLS handshake parsing from hand-built records (layouts from RFC 8446 / RFC 5246)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tapproof.audit import synth, tls
from tapproof.audit.errors import TLSParseError
from tapproof.audit.groups import cipher_suite, group, tls_version_name


def _cert_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db.example.org")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_tls13_pq_handshake() -> None:
    info = tls.parse(synth.client_hello(sni="api.internal"), synth.server_hello(group=0x11EC))
    assert info.client_hello
    assert info.server_hello
    assert info.version == 0x0304
    assert info.cipher == 0x1302
    assert info.group == 0x11EC
    assert info.sni == "api.internal"
    assert info.alpn_offered == ["h2", "http/1.1"]
    assert info.key_shares_offered == [0x11EC, 0x001D]
    assert info.server_done


def test_hello_retry_request_then_server_hello() -> None:
    server = synth.server_hello(group=0x11EC, hrr=True) + synth.server_hello(group=0x11EC)
    info = tls.parse(synth.client_hello(key_shares=[0x001D]), server)
    assert info.hello_retry
    assert info.group == 0x11EC
    assert info.server_hello


def test_hrr_alone_is_not_a_server_hello() -> None:
    info = tls.parse(synth.client_hello(), synth.server_hello(hrr=True, group=0x0017))
    assert info.hello_retry
    assert not info.server_hello


def test_tls12_certificate_and_ecdhe_curve() -> None:
    server = (
        synth.server_hello(version=0x0303, cipher=0xC02B, alpn="h2")
        + synth.certificate(_cert_der())
        + synth.server_key_exchange(0x0017)
        + synth.server_hello_done()
    )
    info = tls.parse(synth.client_hello(versions=()), server)
    assert info.version == 0x0303
    assert info.group == 0x0017
    assert info.alpn == "h2"
    assert info.cert_subject == "CN=db.example.org"
    assert info.cert_not_after == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert info.server_done


def test_handshake_split_across_records_and_cut_buffers() -> None:
    ch = synth.client_hello(record=False)
    # the same ClientHello split over two records
    rec = bytes([22, 3, 1]) + len(ch[:100]).to_bytes(2, "big") + ch[:100]
    rec += bytes([22, 3, 1]) + len(ch[100:]).to_bytes(2, "big") + ch[100:]
    assert tls.parse(rec, b"").client_hello
    part = tls.parse(rec[:150], b"")
    assert not part.client_hello
    assert part.need_client > 150


def test_server_need_hint_points_past_partial_record() -> None:
    server = synth.server_hello()
    info = tls.parse(synth.client_hello(), server[:20])
    assert not info.server_hello
    assert info.need_server >= len(server) - 6  # ServerHello record without the CCS


def test_alert_is_recorded() -> None:
    alert = bytes([21, 3, 3, 0, 2, 2, 40])
    info = tls.parse(synth.client_hello(), alert)
    assert info.alert == 40
    assert not info.server_hello


@pytest.mark.parametrize(
    "data",
    [b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", b"\x16\x09\x01\x00\x01\x00", b"GET / HTTP/1.1\r\n"],
)
def test_garbage_raises_own_error(data: bytes) -> None:
    with pytest.raises(TLSParseError):
        tls.parse(data + bytes(10), b"")


def test_registries() -> None:
    assert group(0x11EC).name == "X25519MLKEM768"
    assert group(0x11EC).pq
    assert group(0x11EB).name == "SecP256r1MLKEM768"
    assert group(0x11ED).pq
    assert group(0x6399).name == "X25519Kyber768Draft00"
    assert not group(0x001D).pq
    assert group(0xABCD).name == "0xABCD"
    assert cipher_suite(0xC02F).kx == "ECDHE"
    assert cipher_suite(0xC02F).aead
    assert cipher_suite(0x0005).broken
    assert tls_version_name(0x0304) == "TLS 1.3"
    assert tls_version_name(0x7F1C) == "TLS 1.3 draft 28"
