"""ControlPlane logic with a real SQLite store and a fake clock (no sockets)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tapproof import identity
from tapproof.control import tlsctx
from tapproof.control.config import ServerConfig, default_db
from tapproof.control.joinstring import parse
from tapproof.control.service import ControlPlane
from tapproof.errors import (
    ConfigError,
    CSRReason,
    CSRRejected,
    EnrollmentRefused,
    NotFound,
    PeerReason,
    PeerRejected,
    TokenReason,
)
from tapproof.pki import certs, csr, keys
from tapproof.pki.ca import init_ca
from tapproof.pki.verify import check_leaf, verify_chain
from tapproof.store import open_store
from tapproof.testing import FakeClock

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def cp(tmp_path: Path) -> ControlPlane:
    clock = FakeClock(T0)
    ca = init_ca(tmp_path, "example.org", T0 - dt.timedelta(days=1))
    cfg = ServerConfig(tmp_path, "example.org", default_db(tmp_path))
    store = open_store(cfg.db, migrate=True)
    return ControlPlane(store, ca, cfg, clock, ["127.0.0.1:7443"])


def _redeem(cp: ControlPlane, secret: str, key: keys.PrivateKey | None = None, sid: identity.SpiffeID | None = None):  # type: ignore[no-untyped-def]
    """Enroll as the API shell does: the CSR's key is the key proven in the TLS handshake."""
    key = key or keys.generate()
    return cp.enroll(secret, csr.build(key, sid).decode(), "test", tls_key=tlsctx.key_der(key.public_key()))


def _enroll(cp: ControlPlane, host: str = "web-1"):  # type: ignore[no-untyped-def]
    js = parse(cp.create_token(host, dt.timedelta(minutes=15), "admin"))
    key = keys.generate()
    return key, _redeem(cp, js.secret, key)


def test_token_carries_fingerprint_and_servers(cp: ControlPlane) -> None:
    js = parse(cp.create_token("web-1", dt.timedelta(minutes=15), "admin"))
    assert js.fingerprint == cp.ca.root_fingerprint
    assert js.servers == ("127.0.0.1:7443",)
    tokens = cp.store.list_tokens()
    assert [t.token_hash for t in tokens] == [js.token_hash]
    assert js.secret not in repr(tokens)  # only the hash is stored


def test_enroll_issues_one_hour_spiffe_cert(cp: ControlPlane) -> None:
    key, issued = _enroll(cp)
    chain = certs.load_pem_chain(issued.chain_pem.encode())
    assert chain[0].public_key() == key.public_key()
    assert issued.spiffe_id == "spiffe://example.org/host/web-1"
    verify_chain(chain[0], chain[1:], [cp.ca.root], T0)
    assert check_leaf(chain[0], trust_domain="example.org", now=T0, usage="client").name == "web-1"
    assert chain[0].not_valid_after_utc - T0 == dt.timedelta(hours=1)
    assert cp.store.get_host("web-1").enrolled_at == T0
    assert [e.action for e in cp.store.list_audit()][-2:] == ["token-create", "enroll"]


def test_token_single_use(cp: ControlPlane) -> None:
    js = parse(cp.create_token("web-1", dt.timedelta(minutes=15), "admin"))
    _redeem(cp, js.secret)
    with pytest.raises(EnrollmentRefused) as ei:
        _redeem(cp, js.secret)
    assert ei.value.reason is TokenReason.USED


def test_same_key_may_repeat_a_redemption_whose_answer_was_lost(cp: ControlPlane) -> None:
    js = parse(cp.create_token("web-1", dt.timedelta(minutes=15), "admin"))
    key = keys.generate()
    first = _redeem(cp, js.secret, key)
    cp.clock.advance(30)  # type: ignore[attr-defined]
    again = _redeem(cp, js.secret, key)  # a new certificate for the same key and host
    assert again.serial != first.serial
    assert again.spiffe_id == first.spiffe_id == "spiffe://example.org/host/web-1"
    chain = certs.load_pem_chain(again.chain_pem.encode())
    assert chain[0].public_key() == key.public_key()
    assert cp.store.get_certificate(again.serial).host == "web-1"
    assert [e.action for e in cp.store.list_audit()][-2:] == ["enroll", "enroll-repeated"]
    with pytest.raises(EnrollmentRefused) as ei:  # anyone else holding the secret: used
        _redeem(cp, js.secret)
    assert ei.value.reason is TokenReason.USED
    cp.clock.advance(15 * 60)  # type: ignore[attr-defined]
    with pytest.raises(EnrollmentRefused) as ei:  # past the token's expiry: used, even for the same key
        _redeem(cp, js.secret, key)
    assert ei.value.reason is TokenReason.USED


def test_token_expired_and_unknown(cp: ControlPlane) -> None:
    js = parse(cp.create_token("web-1", dt.timedelta(minutes=1), "admin"))
    cp.clock.advance(61)  # type: ignore[attr-defined]
    with pytest.raises(EnrollmentRefused) as ei:
        _redeem(cp, js.secret)
    assert ei.value.reason is TokenReason.EXPIRED
    with pytest.raises(EnrollmentRefused) as ei:
        _redeem(cp, "A" * 43)
    assert ei.value.reason is TokenReason.UNKNOWN


def test_csr_for_other_identity_refused_and_token_kept(cp: ControlPlane) -> None:
    js = parse(cp.create_token("web-1", dt.timedelta(minutes=15), "admin"))
    with pytest.raises(CSRRejected) as ei:
        _redeem(cp, js.secret, sid=identity.host_id("example.org", "db-1"))
    assert ei.value.reason is CSRReason.IDENTITY_MISMATCH
    _redeem(cp, js.secret)  # token still usable


def test_csr_for_another_key_than_the_tls_one_refused_and_token_kept(cp: ControlPlane) -> None:
    js = parse(cp.create_token("web-1", dt.timedelta(minutes=15), "admin"))
    other = tlsctx.key_der(keys.generate().public_key())
    for tls_key in (other, b""):
        with pytest.raises(CSRRejected) as ei:
            cp.enroll(js.secret, csr.build(keys.generate(), None).decode(), "t", tls_key=tls_key)
        assert ei.value.reason is CSRReason.KEY_MISMATCH
    _redeem(cp, js.secret)  # token still usable


def test_renew_same_identity_new_key(cp: ControlPlane) -> None:
    _, first = _enroll(cp)
    cp.clock.advance(1800)  # type: ignore[attr-defined]
    key2 = keys.generate()
    peer = identity.host_id("example.org", "web-1")
    again = cp.renew(peer, csr.build(key2, peer).decode())
    assert again.spiffe_id == first.spiffe_id
    assert again.serial != first.serial
    assert certs.load_pem_chain(again.chain_pem.encode())[0].public_key() == key2.public_key()


def test_renew_refusals(cp: ControlPlane) -> None:
    _enroll(cp)
    with pytest.raises(PeerRejected) as ei:
        cp.renew(identity.host_id("example.org", "ghost"), csr.build(keys.generate(), None).decode())
    assert ei.value.reason is PeerReason.UNTRUSTED
    with pytest.raises(PeerRejected) as ei:
        cp.renew(identity.service_id("example.org", "x"), csr.build(keys.generate(), None).decode())
    assert ei.value.reason is PeerReason.WRONG_IDENTITY
    serials = cp.revoke_host("web-1", "stolen", "admin")
    assert len(serials) == 1
    assert serials[0] in cp.revocations()["serials"]
    assert cp.revocations()["hosts"] == ["web-1"]
    with pytest.raises(PeerRejected) as ei:
        cp.renew(identity.host_id("example.org", "web-1"), csr.build(keys.generate(), None).decode())
    assert ei.value.reason is PeerReason.REVOKED
    with pytest.raises(ConfigError):  # a revoked name cannot enroll again
        cp.create_token("web-1", dt.timedelta(minutes=5), "admin")


def test_revoke_by_serial_and_unknown(cp: ControlPlane) -> None:
    _, issued = _enroll(cp)
    assert cp.revoke_serial(issued.serial, "", "admin") == issued.spiffe_id
    assert issued.serial in cp.revoked_serials(max_age=0)
    with pytest.raises(NotFound):
        cp.revoke_serial("abcdef", "", "admin")


def test_registry_and_policy(cp: ControlPlane) -> None:
    _enroll(cp)
    peer = identity.host_id("example.org", "web-1")
    cp.register(peer, "10.0.0.1:7444", {"redis": "cache"})
    reg = cp.registry_tagged()[1]
    assert reg["hosts"]["web-1"]["advertise"] == "10.0.0.1:7444"
    assert reg["services"] == [
        {"name": "redis", "host": "web-1", "advertise": "10.0.0.1:7444", "spiffe_id": "spiffe://example.org/svc/redis"}
    ]
    v0 = cp.policy()["version"]
    rid = cp.add_rule("allow", "host/web-*", "redis", "", "", "admin")
    pol = cp.policy()
    assert pol["version"] != v0
    assert pol["rules"][0]["source"] == "spiffe://example.org/host/web-*"
    cp.set_default_policy("deny", "admin")
    assert cp.policy()["default"] == "deny"
    cp.remove_rule(rid, "admin")
    assert cp.policy()["rules"] == []
    with pytest.raises(ConfigError):
        cp.add_rule("maybe", "*", "*", "", "", "admin")


def test_status(cp: ControlPlane) -> None:
    _enroll(cp)
    cp.clock.advance(3600 - 600)  # type: ignore[attr-defined]
    st = cp.status(dt.timedelta(minutes=15))
    assert st["hosts"]["total"] == 1
    assert len(st["expiring_soon"]) == 1
    assert st["root"]["fingerprint"] == cp.ca.root_fingerprint


def test_create_token_validation(cp: ControlPlane) -> None:
    with pytest.raises(ConfigError):
        cp.create_token("Bad Name", dt.timedelta(minutes=5), "admin")
    with pytest.raises(ConfigError):
        cp.create_token("ok", dt.timedelta(days=30), "admin")


def test_revoked_serial_cannot_renew_itself(cp: ControlPlane) -> None:
    _, issued = _enroll(cp)
    peer = identity.host_id("example.org", "web-1")
    cp.revoke_serial(issued.serial, "stolen key", "admin")
    with pytest.raises(PeerRejected) as ei:
        cp.renew(peer, csr.build(keys.generate(), peer).decode(), issued.serial)
    assert ei.value.reason is PeerReason.REVOKED
