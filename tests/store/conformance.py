"""The store conformance suite: what every :class:`~tapproof.store.base.Store` must do.

These tests use only the ``Store`` protocol and a ``store`` fixture that yields
a fresh, empty store. ``tests/store/test_conformance.py`` runs them on SQLite
and on PostgreSQL; a new backend (or an in-memory fake) runs them by importing
this module into a test module next to its own ``store`` fixture::

    from tests.store.conformance import *  # noqa: F403
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Callable

import pytest

from tapproof.errors import Conflict, EnrollmentRefused, NotFound, TokenReason
from tapproof.store.base import (
    REPEAT_WINDOW,
    CertificateRecord,
    CertKind,
    PolicyRuleRecord,
    ServiceRecord,
    Store,
    TokenRecord,
    TrustRootRecord,
)

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
MIN = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
TD = "spiffe://example.org"


def cert(
    serial: str,
    host: str | None = "web1",
    *,
    not_after: dt.datetime = T0 + HOUR,
    kind: CertKind = "host",
    revoked_at: dt.datetime | None = None,
) -> CertificateRecord:
    """A certificate record for tests."""
    return CertificateRecord(
        serial=serial,
        spiffe_id=f"{TD}/host/{host or 'none'}",
        kind=kind,
        not_before=T0 - MIN,
        not_after=not_after,
        issued_at=T0,
        issuer=f"{TD}/tapproof/server",
        host=host,
        revoked_at=revoked_at,
    )


def token(h: str = "t1", host: str = "web1", *, created: dt.datetime = T0) -> TokenRecord:
    """A token valid for 15 minutes from ``created``."""
    return TokenRecord(
        token_hash=h,
        host=host,
        created_at=created,
        expires_at=created + 15 * MIN,
        created_by="admin",
    )


def issuer(serial: str = "01") -> Callable[[str], CertificateRecord]:
    """An ``issue`` callback that signs one certificate for the host it is given."""
    return lambda host: cert(serial, host)


def root(fp: str, created: dt.datetime, state: str = "active") -> TrustRootRecord:
    """A trust root record."""
    return TrustRootRecord(
        fingerprint=fp * 64 if len(fp) == 1 else fp,
        cert_pem=f"-----BEGIN CERTIFICATE-----\n{fp}\n-----END CERTIFICATE-----\n",
        state=state,  # type: ignore[arg-type]
        created_at=created,
    )


def run_threads(n: int, fn: Callable[[int], None]) -> None:
    """Run ``fn(i)`` in ``n`` threads released together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "worker threads hung"
    if errors:
        raise errors[0]


# --- lifecycle and settings ----------------------------------------------------


def test_fresh_store_is_empty_and_current(store: Store) -> None:
    assert store.schema_version() >= 1
    assert store.list_hosts() == []
    assert store.list_tokens(include_used=True) == []
    assert store.list_trust_roots() == []
    assert store.list_services() == []
    assert store.list_policy_rules() == (0, [])
    assert store.list_audit() == []
    assert store.revoked_serials(T0) == []


def test_settings_default_set_overwrite(store: Store) -> None:
    assert store.get_setting("default_policy") is None
    assert store.get_setting("default_policy", "deny") == "deny"
    store.set_setting("default_policy", "allow")
    assert store.get_setting("default_policy", "deny") == "allow"
    store.set_setting("default_policy", "deny")
    store.set_setting("leaf_ttl", "")
    assert store.get_setting("default_policy") == "deny"
    assert store.get_setting("leaf_ttl", "1h") == ""


# --- trust roots ---------------------------------------------------------------


def test_trust_roots_oldest_first_and_duplicate_conflict(store: Store) -> None:
    store.add_trust_root(root("b", T0))
    store.add_trust_root(root("a", T0 + HOUR, "prepared"))
    store.add_trust_root(root("c", T0 - HOUR))
    assert [r.fingerprint[0] for r in store.list_trust_roots()] == ["c", "b", "a"]
    assert store.list_trust_roots()[2] == root("a", T0 + HOUR, "prepared")
    with pytest.raises(Conflict):
        store.add_trust_root(root("b", T0 + 2 * HOUR))
    assert len(store.list_trust_roots()) == 3


def test_trust_root_state_and_removal(store: Store) -> None:
    store.add_trust_root(root("a", T0, "prepared"))
    store.set_trust_root_state("a" * 64, "active")
    assert store.list_trust_roots()[0].state == "active"
    store.set_trust_root_state("a" * 64, "retiring")
    assert store.list_trust_roots()[0].state == "retiring"
    with pytest.raises(NotFound):
        store.set_trust_root_state("f" * 64, "active")
    store.remove_trust_root("a" * 64)
    assert store.list_trust_roots() == []
    with pytest.raises(NotFound):
        store.remove_trust_root("a" * 64)


# --- tokens and enrollment -----------------------------------------------------


def test_tokens_newest_first_and_duplicate_conflict(store: Store) -> None:
    store.add_token(token("t1", created=T0))
    store.add_token(token("t2", created=T0 + MIN))
    store.add_token(token("t3", created=T0 - MIN))
    assert [t.token_hash for t in store.list_tokens()] == ["t2", "t1", "t3"]
    assert store.list_tokens()[1] == token("t1", created=T0)
    with pytest.raises(Conflict):
        store.add_token(token("t1", host="other"))


def test_list_tokens_hides_used_unless_asked(store: Store) -> None:
    store.add_token(token("t1"))
    store.add_token(token("t2", created=T0 + MIN))
    store.redeem_token("t1", T0 + MIN, issuer())
    assert [t.token_hash for t in store.list_tokens()] == ["t2"]
    both = store.list_tokens(include_used=True)
    assert [t.token_hash for t in both] == ["t2", "t1"]
    assert both[1].used_at == T0 + MIN


def test_redeem_success_spends_token_records_cert_and_creates_host(store: Store) -> None:
    store.add_token(token("t1", host="web1"))
    now = T0 + 5 * MIN
    seen: list[str] = []

    def issue(host: str) -> CertificateRecord:
        seen.append(host)
        return cert("0a1b", host)

    tok, crt = store.redeem_token("t1", now, issue)
    assert seen == ["web1"]
    assert tok == dataclasses.replace(token("t1"), used_at=now)
    assert crt == cert("0a1b", "web1")
    assert store.get_certificate("0a1b") == crt
    host = store.get_host("web1")
    assert host.name == "web1"
    assert host.enrolled_at == now
    assert host.created_at == now
    assert host.revoked_at is None
    assert host.spiffe_id == crt.spiffe_id
    assert [h.name for h in store.list_hosts()] == ["web1"]


def test_redeem_reenrolls_existing_host(store: Store) -> None:
    store.add_token(token("t1"))
    store.add_token(token("t2"))
    store.redeem_token("t1", T0, issuer("01"))
    store.update_host_seen("web1", T0 + MIN, advertise="10.0.0.1:7444")
    store.redeem_token("t2", T0 + 2 * MIN, issuer("02"))
    host = store.get_host("web1")
    assert host.created_at == T0
    assert host.enrolled_at == T0 + 2 * MIN
    assert host.advertise == "10.0.0.1:7444"
    assert store.get_certificate("02").host == "web1"


def test_redeem_unknown_token(store: Store) -> None:
    with pytest.raises(EnrollmentRefused) as info:
        store.redeem_token("nope", T0, issuer())
    assert info.value.reason is TokenReason.UNKNOWN


def test_redeem_expired_token_at_and_after_expiry(store: Store) -> None:
    store.add_token(token("t1"))
    for now in (T0 + 15 * MIN, T0 + 16 * MIN):
        with pytest.raises(EnrollmentRefused) as info:
            store.redeem_token("t1", now, issuer())
        assert info.value.reason is TokenReason.EXPIRED
    assert store.list_tokens()[0].used_at is None
    store.redeem_token("t1", T0 + 15 * MIN - dt.timedelta(microseconds=1), issuer())


def test_redeem_used_token(store: Store) -> None:
    store.add_token(token("t1"))
    store.redeem_token("t1", T0, issuer("01"))
    with pytest.raises(EnrollmentRefused) as info:
        store.redeem_token("t1", T0 + MIN, issuer("02"))
    assert info.value.reason is TokenReason.USED
    with pytest.raises(NotFound):
        store.get_certificate("02")


def test_redeem_repeated_by_the_same_key_until_expiry(store: Store) -> None:
    key_a, key_b = "a" * 64, "b" * 64
    store.add_token(token("t1"))
    tok, _ = store.redeem_token("t1", T0 + MIN, issuer("01"), key=key_a)
    assert (tok.used_at, tok.redeemed_key) == (T0 + MIN, key_a)
    # the answer was lost: the same key asks again and gets a new certificate, recorded
    again, crt = store.redeem_token("t1", T0 + 2 * MIN, issuer("02"), key=key_a)
    assert (again.used_at, again.redeemed_key) == (T0 + MIN, key_a)  # the first use stands
    assert store.get_certificate("02") == crt
    assert store.get_host("web1").enrolled_at == T0 + 2 * MIN
    used = store.list_tokens(include_used=True)[0]
    assert (used.used_at, used.redeemed_key) == (T0 + MIN, key_a)
    # any other key, no key, or the same key once the token expired: used
    for key, when, serial in ((key_b, T0 + 3 * MIN, "03"), ("", T0 + 3 * MIN, "04"), (key_a, T0 + 15 * MIN, "05")):
        with pytest.raises(EnrollmentRefused) as info:
            store.redeem_token("t1", when, issuer(serial), key=key)
        assert info.value.reason is TokenReason.USED
        with pytest.raises(NotFound):
            store.get_certificate(serial)
    # nor once the host was revoked
    store.revoke_host("web1", T0 + 4 * MIN, "stolen")
    with pytest.raises(EnrollmentRefused) as info:
        store.redeem_token("t1", T0 + 5 * MIN, issuer("06"), key=key_a)
    assert info.value.reason is TokenReason.HOST_REVOKED


def _long_token(h: str, host: str = "web1") -> TokenRecord:
    return dataclasses.replace(token(h, host), expires_at=T0 + 24 * HOUR)


def test_a_repeat_cannot_undo_a_revocation_or_outlive_its_window(store: Store) -> None:
    key = "c" * 64
    # a long-lived token: the repeat window, not the token's expiry, ends it
    store.add_token(_long_token("t1", "web1"))
    store.redeem_token("t1", T0, issuer("11"), key=key)
    store.redeem_token("t1", T0 + REPEAT_WINDOW - MIN, issuer("12"), key=key)
    with pytest.raises(EnrollmentRefused) as info:
        store.redeem_token("t1", T0 + REPEAT_WINDOW, issuer("13"), key=key)
    assert info.value.reason is TokenReason.USED
    # a certificate issued since the first use was revoked: the key may not get a fresh one
    store.add_token(_long_token("t2", "web2"))
    store.redeem_token("t2", T0, lambda host: cert("21", host), key=key)
    store.revoke_certificate("21", T0 + MIN)
    with pytest.raises(EnrollmentRefused) as info:
        store.redeem_token("t2", T0 + 2 * MIN, lambda host: cert("22", host), key=key)
    assert info.value.reason is TokenReason.USED
    # the host was enrolled again with a later token: the older one cannot be repeated
    store.add_token(_long_token("t3", "web3"))
    store.add_token(_long_token("t4", "web3"))
    store.redeem_token("t3", T0, lambda host: cert("31", host), key=key)
    store.redeem_token("t4", T0 + MIN, lambda host: cert("41", host), key="d" * 64)
    with pytest.raises(EnrollmentRefused) as info:
        store.redeem_token("t3", T0 + 2 * MIN, lambda host: cert("32", host), key=key)
    assert info.value.reason is TokenReason.USED
    for serial in ("13", "22", "32"):
        with pytest.raises(NotFound):
            store.get_certificate(serial)


def test_redeem_for_revoked_host(store: Store) -> None:
    store.add_token(token("t1"))
    store.add_token(token("t2"))
    store.redeem_token("t1", T0, issuer("01"))
    store.revoke_host("web1", T0 + MIN, "stolen")
    called: list[str] = []

    def issue(host: str) -> CertificateRecord:
        called.append(host)
        return cert("02", host)

    with pytest.raises(EnrollmentRefused) as info:
        store.redeem_token("t2", T0 + 2 * MIN, issue)
    assert info.value.reason is TokenReason.HOST_REVOKED
    assert called == []
    assert store.list_tokens()[0].token_hash == "t2"  # still unspent


def test_redeem_issue_failure_leaves_token_unspent(store: Store) -> None:
    store.add_token(token("t1"))

    class SigningFailed(Exception):
        pass

    def broken(host: str) -> CertificateRecord:
        raise SigningFailed(host)

    with pytest.raises(SigningFailed):
        store.redeem_token("t1", T0, broken)
    assert [t.token_hash for t in store.list_tokens()] == ["t1"]
    assert store.list_tokens()[0].used_at is None
    assert store.list_hosts() == []
    store.redeem_token("t1", T0, issuer("01"))
    assert store.get_host("web1").enrolled_at == T0


def test_redeem_duplicate_serial_conflict_leaves_token_unspent(store: Store) -> None:
    store.record_certificate(cert("01", "other"))
    store.add_token(token("t1"))
    with pytest.raises(Conflict):
        store.redeem_token("t1", T0, issuer("01"))
    assert store.list_tokens()[0].used_at is None
    assert store.list_hosts() == []


def test_concurrent_redemption_exactly_one_wins(store: Store) -> None:
    store.add_token(token("t1"))
    n = 50
    wins: list[int] = []
    refusals: list[TokenReason] = []
    lock = threading.Lock()

    def redeem(i: int) -> None:
        try:
            store.redeem_token("t1", T0, issuer(f"{i:04x}"))
        except EnrollmentRefused as exc:
            with lock:
                refusals.append(exc.reason)
        else:
            with lock:
                wins.append(i)

    run_threads(n, redeem)
    assert len(wins) == 1
    assert refusals == [TokenReason.USED] * (n - 1)
    assert store.get_certificate(f"{wins[0]:04x}").host == "web1"
    assert len(store.list_hosts()) == 1


# --- hosts ---------------------------------------------------------------------


def enroll(store: Store, host: str, serial: str) -> None:
    """Enroll ``host`` with a certificate ``serial`` through a token."""
    store.add_token(token(f"tok-{host}-{serial}", host))
    store.redeem_token(f"tok-{host}-{serial}", T0, issuer(serial))


def test_get_host_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_host("ghost")


def test_hosts_listed_by_name(store: Store) -> None:
    for i, name in enumerate(["db2", "web1", "app3"]):
        enroll(store, name, f"0{i}")
    assert [h.name for h in store.list_hosts()] == ["app3", "db2", "web1"]


def test_update_host_seen_and_advertise(store: Store) -> None:
    enroll(store, "web1", "01")
    store.update_host_seen("web1", T0 + MIN, advertise="10.0.0.1:7444")
    store.update_host_seen("web1", T0 + 2 * MIN)
    host = store.get_host("web1")
    assert host.last_seen == T0 + 2 * MIN
    assert host.advertise == "10.0.0.1:7444"


def test_revoke_host_revokes_unexpired_certificates(store: Store) -> None:
    enroll(store, "web1", "01")
    store.record_certificate(cert("02", "web1", not_after=T0 + 2 * HOUR))
    store.record_certificate(cert("03", "web1", not_after=T0 - MIN))  # already expired
    store.record_certificate(cert("04", "web2"))
    store.record_certificate(cert("05", None, kind="server"))
    now = T0 + MIN
    assert store.revoke_host("web1", now, "compromised") == ["01", "02"]
    host = store.get_host("web1")
    assert host.revoked_at == now
    assert host.revoke_reason == "compromised"
    assert store.get_certificate("01").revoked_at == now
    assert store.get_certificate("03").revoked_at is None
    assert store.get_certificate("04").revoked_at is None
    assert store.revoked_serials(now) == ["01", "02"]


def test_revoke_host_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.revoke_host("ghost", T0, "why")


# --- certificates --------------------------------------------------------------


def test_record_and_get_certificate_round_trip(store: Store) -> None:
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    c = dataclasses.replace(
        cert("00ff", None, kind="admin"),
        not_before=T0.astimezone(tz),
        issued_at=T0 + dt.timedelta(microseconds=123456),
    )
    store.record_certificate(c)
    got = store.get_certificate("00ff")
    assert got == c
    for value in (got.not_before, got.not_after, got.issued_at):
        assert value.utcoffset() == dt.timedelta(0)
    with pytest.raises(NotFound):
        store.get_certificate("ff00")


def test_duplicate_serial_conflict(store: Store) -> None:
    store.record_certificate(cert("01"))
    with pytest.raises(Conflict):
        store.record_certificate(cert("01", "web2"))
    assert store.get_certificate("01").host == "web1"


def test_revoke_certificate_idempotent(store: Store) -> None:
    store.record_certificate(cert("01"))
    first = store.revoke_certificate("01", T0 + MIN)
    assert first.revoked_at == T0 + MIN
    again = store.revoke_certificate("01", T0 + 2 * MIN)
    assert again.revoked_at == T0 + MIN
    assert store.get_certificate("01") == first
    with pytest.raises(NotFound):
        store.revoke_certificate("02", T0)


def test_revoked_serials_drop_once_expired(store: Store) -> None:
    store.record_certificate(cert("01", not_after=T0 + HOUR))
    store.record_certificate(cert("02", not_after=T0 + 2 * HOUR))
    store.record_certificate(cert("03", not_after=T0 + 2 * HOUR))
    store.revoke_certificate("02", T0)
    store.revoke_certificate("01", T0)
    assert store.revoked_serials(T0) == ["01", "02"]
    assert store.revoked_serials(T0 + HOUR) == ["02"]  # 01 expired at exactly T0 + 1h
    assert store.revoked_serials(T0 + 2 * HOUR) == []


def test_latest_certificate_of_a_host(store: Store) -> None:
    assert store.latest_certificate("web1") is None
    store.record_certificate(dataclasses.replace(cert("01"), issued_at=T0))
    store.record_certificate(dataclasses.replace(cert("02", not_after=T0 - MIN), issued_at=T0 + MIN))
    store.record_certificate(dataclasses.replace(cert("03", host="web2"), issued_at=T0 + 2 * MIN))
    store.revoke_certificate("02", T0)
    latest = store.latest_certificate("web1")  # expired and revoked ones count: "latest" is about issuance
    assert latest is not None
    assert latest.serial == "02"
    latest2 = store.latest_certificate("web2")
    assert latest2 is not None
    assert latest2.serial == "03"


def test_certificates_expiring_window(store: Store) -> None:
    store.record_certificate(cert("early", not_after=T0 - MIN))  # already expired
    store.record_certificate(cert("edge", not_after=T0))  # now <= not_after: included
    store.record_certificate(cert("soon", not_after=T0 + 30 * MIN))
    store.record_certificate(cert("late", not_after=T0 + HOUR))  # == now + within: excluded
    store.record_certificate(cert("gone", not_after=T0 + 10 * MIN))
    store.revoke_certificate("gone", T0)
    got = store.certificates_expiring(T0, HOUR)
    assert [c.serial for c in got] == ["edge", "soon"]
    assert got[1] == cert("soon", not_after=T0 + 30 * MIN)
    assert store.certificates_expiring(T0, dt.timedelta(0)) == []


# --- services ------------------------------------------------------------------


def svc(name: str, host: str, port: int = 6379) -> ServiceRecord:
    """A service record."""
    return ServiceRecord(name=name, host=host, advertise=f"{host}:{port}", registered_at=T0)


def test_register_services_replaces_the_hosts_set(store: Store) -> None:
    store.register_services("web1", [svc("redis", "web1"), svc("api", "web1", 8080)])
    store.register_services("web2", [svc("redis", "web2")])
    assert [(s.name, s.host) for s in store.list_services()] == [
        ("api", "web1"),
        ("redis", "web1"),
        ("redis", "web2"),
    ]
    store.register_services("web1", [svc("redis", "web1", 7000)])
    assert store.list_services() == [svc("redis", "web1", 7000), svc("redis", "web2")]
    store.register_services("web1", [])
    assert store.list_services() == [svc("redis", "web2")]


def test_register_services_duplicate_name_is_conflict_and_changes_nothing(store: Store) -> None:
    store.register_services("web1", [svc("redis", "web1")])
    with pytest.raises(Conflict):
        store.register_services("web1", [svc("api", "web1"), svc("api", "web1", 1)])
    assert store.list_services() == [svc("redis", "web1")]


# --- policy --------------------------------------------------------------------


def rule(source: str = f"{TD}/host/web-*", service: str = "redis", **kw: object) -> PolicyRuleRecord:
    """A policy rule before insertion."""
    return PolicyRuleRecord(0, "allow", source, service, **kw)  # type: ignore[arg-type]


def test_policy_add_remove_bump_version(store: Store) -> None:
    a = store.add_policy_rule(rule(ports="6379,7000-7010", created_at=T0, comment="cache"))
    b = store.add_policy_rule(dataclasses.replace(rule(service="*"), action="deny"))
    assert a.rule_id > 0
    assert b.rule_id > a.rule_id
    assert a == dataclasses.replace(rule(ports="6379,7000-7010", created_at=T0, comment="cache"), rule_id=a.rule_id)
    assert store.list_policy_rules() == (2, [a, b])
    store.remove_policy_rule(a.rule_id)
    assert store.list_policy_rules() == (3, [b])
    with pytest.raises(NotFound):
        store.remove_policy_rule(a.rule_id)
    assert store.list_policy_rules()[0] == 3  # a failed removal changes nothing
    c = store.add_policy_rule(rule())
    assert c.rule_id > b.rule_id  # ids are never reused
    assert store.list_policy_rules() == (4, [b, c])


def test_concurrent_policy_edits_are_never_lost(store: Store) -> None:
    threads, per_thread = 8, 10
    added: list[int] = []
    lock = threading.Lock()

    def edit(i: int) -> None:
        for j in range(per_thread):
            r = store.add_policy_rule(rule(service=f"svc-{i}-{j}"))
            with lock:
                added.append(r.rule_id)
            if j % 2:
                store.remove_policy_rule(r.rule_id)

    run_threads(threads, edit)
    version, rules = store.list_policy_rules()
    assert len(set(added)) == threads * per_thread
    assert version == threads * per_thread + threads * per_thread // 2
    assert sorted(r.service for r in rules) == sorted(
        f"svc-{i}-{j}" for i in range(threads) for j in range(0, per_thread, 2)
    )


def test_policy_version_and_rules_are_read_together(store: Store) -> None:
    stop = threading.Event()
    seen: list[tuple[int, int]] = []

    def read(_i: int) -> None:
        while not stop.is_set():
            version, rules = store.list_policy_rules()
            seen.append((version, len(rules)))

    def write(_i: int) -> None:
        try:
            for k in range(15):
                store.add_policy_rule(rule(service=f"s{k}"))
        finally:
            stop.set()

    run_threads(2, lambda i: (read if i else write)(i))
    assert seen
    assert all(version == count for version, count in seen)  # only adds: version == len


# --- audit log -----------------------------------------------------------------


def test_audit_append_and_list_in_order(store: Store) -> None:
    detail = {"host": "web1", "serials": ["01", "02"], "n": 3, "ok": True, "x": None}
    ids = [store.append_audit(T0 + i * MIN, f"admin{i}", f"action{i}", {**detail, "i": i}) for i in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    entries = store.list_audit()
    assert [e.entry_id for e in entries] == ids
    assert entries[2].ts == T0 + 2 * MIN
    assert entries[2].actor == "admin2"
    assert entries[2].action == "action2"
    assert entries[2].detail == {**detail, "i": 2}
    assert [e.entry_id for e in store.list_audit(since_id=ids[1])] == ids[2:]
    assert [e.entry_id for e in store.list_audit(since_id=ids[1], limit=2)] == ids[2:4]
    assert store.list_audit(since_id=ids[-1]) == []


def test_audit_concurrent_appends_get_distinct_ids(store: Store) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def append(i: int) -> None:
        for j in range(5):
            entry_id = store.append_audit(T0, f"t{i}", "x", {"j": j})
            with lock:
                got.append(entry_id)

    run_threads(8, append)
    assert len(set(got)) == 40
    assert [e.entry_id for e in store.list_audit()] == sorted(got)


# --- revocations read by agents, registry version ----------------------------------


def test_revoked_hosts_are_the_revoked_ones_sorted(store: Store) -> None:
    assert store.revoked_hosts() == []
    for i, name in enumerate(["web3", "web1", "web2", "db1"]):
        enroll(store, name, f"0{i}")
    store.revoke_host("web3", T0, "gone")
    store.revoke_host("db1", T0 + MIN, "gone")
    store.revoke_host("web3", T0 + 2 * MIN, "again")  # idempotent: listed once
    store.revoke_certificate("02", T0)  # a revoked certificate does not make its host revoked
    assert store.revoked_hosts() == ["db1", "web3"]
    assert store.revoked_hosts() == sorted(h.name for h in store.list_hosts() if h.revoked_at is not None)


def _counter(store: Store) -> int:
    return store.registry_version().counter


def test_registry_version_moves_with_each_change_only(store: Store) -> None:
    v0 = store.registry_version()
    assert v0.epoch  # random per database
    steps: list[tuple[str, Callable[[], object], int]] = [
        ("enroll a new host", lambda: enroll(store, "web1", "01"), 1),
        ("enroll a known host again", lambda: enroll(store, "web1", "02"), 0),
        ("check in", lambda: store.update_host_seen("web1", T0 + MIN), 0),
        ("advertise", lambda: store.update_host_seen("web1", T0 + MIN, advertise="10.0.0.1:7444"), 1),
        ("same advertise", lambda: store.update_host_seen("web1", T0 + 2 * MIN, advertise="10.0.0.1:7444"), 0),
        ("held bundle", lambda: store.update_host_seen("web1", T0 + 2 * MIN, bundle="aa,bb"), 0),
        ("new advertise", lambda: store.update_host_seen("web1", T0 + 3 * MIN, advertise="10.0.0.9:7444"), 1),
        ("services", lambda: store.register_services("web1", [svc("redis", "web1"), svc("api", "web1", 80)]), 1),
        (
            "same services again, later and in another order",
            lambda: store.register_services(
                "web1",
                [
                    dataclasses.replace(s, registered_at=T0 + HOUR)
                    for s in (svc("api", "web1", 80), svc("redis", "web1"))
                ],
            ),
            0,
        ),
        (
            "a service moves",
            lambda: store.register_services("web1", [svc("redis", "web1", 7000), svc("api", "web1", 80)]),
            1,
        ),
        ("a service goes", lambda: store.register_services("web1", [svc("redis", "web1", 7000)]), 1),
        ("a service is renamed", lambda: store.register_services("web1", [svc("cache", "web1", 7000)]), 1),
        ("all go", lambda: store.register_services("web1", []), 1),
        ("none again", lambda: store.register_services("web1", []), 0),
        ("revoke a certificate", lambda: store.revoke_certificate("02", T0), 0),
        ("revoke the host", lambda: store.revoke_host("web1", T0 + 4 * MIN, "gone"), 1),
        ("revoke it again", lambda: store.revoke_host("web1", T0 + 5 * MIN, "again"), 0),
        ("policy", lambda: store.add_policy_rule(rule()), 0),
    ]
    for what, step, bump in steps:
        before = _counter(store)
        step()
        assert _counter(store) == before + bump, what
    assert store.registry_version().epoch == v0.epoch


def test_unchanged_registration_keeps_the_first_registration_time(store: Store) -> None:
    store.register_services("web1", [svc("redis", "web1")])
    store.register_services("web1", [dataclasses.replace(svc("redis", "web1"), registered_at=T0 + HOUR)])
    assert store.list_services() == [svc("redis", "web1")]


def test_failed_registration_does_not_bump(store: Store) -> None:
    store.register_services("web1", [svc("redis", "web1")])
    before = _counter(store)
    with pytest.raises(Conflict):
        store.register_services("web1", [svc("api", "web1"), svc("api", "web1", 1)])
    assert _counter(store) == before
    with pytest.raises(NotFound):
        store.update_host_seen("ghost", T0, advertise="10.0.0.1:1")
    assert _counter(store) == before


def test_registry_snapshot_is_the_lists_at_the_current_version(store: Store) -> None:
    enroll(store, "web1", "01")
    enroll(store, "web2", "02")
    store.update_host_seen("web2", T0, advertise="10.0.0.2:7444")
    store.register_services("web2", [svc("redis", "web2")])
    store.revoke_host("web1", T0, "gone")
    snap = store.registry_snapshot()
    assert snap.version == store.registry_version()
    assert snap.hosts == store.list_hosts()
    assert snap.services == store.list_services()


def test_concurrent_registry_changes_are_never_lost(store: Store) -> None:
    hosts = 6
    for i in range(hosts):
        enroll(store, f"web{i}", f"0{i}")
    before = _counter(store)

    def change(i: int) -> None:
        for port in range(3):  # three changes, then a repeat that is no change
            store.register_services(f"web{i}", [svc("redis", f"web{i}", 7000 + port)])
        store.register_services(f"web{i}", [svc("redis", f"web{i}", 7002)])

    run_threads(hosts, change)
    assert _counter(store) == before + 3 * hosts


# --- control-plane servers -------------------------------------------------------


def test_servers_listed_most_recent_first_and_stale_ones_dropped(store: Store) -> None:
    assert store.list_servers(T0 - HOUR) == []
    store.register_server("10.0.0.1:7443", T0 - 2 * HOUR)
    store.register_server("10.0.0.2:7443", T0)
    store.register_server("[fd00::3]:7443", T0 - MIN)
    assert store.list_servers(T0 - HOUR) == ["10.0.0.2:7443", "[fd00::3]:7443"]
    store.register_server("10.0.0.1:7443", T0 + MIN)  # announces again: back in, first
    assert store.list_servers(T0 - HOUR) == ["10.0.0.1:7443", "10.0.0.2:7443", "[fd00::3]:7443"]
    assert store.get_setting("default_policy") is None  # server rows do not leak into other settings


def test_concurrent_server_announcements_are_all_kept(store: Store) -> None:
    run_threads(10, lambda i: store.register_server(f"10.0.1.{i}:7443", T0 + i * MIN))
    assert store.list_servers(T0) == [f"10.0.1.{i}:7443" for i in reversed(range(10))]


__all__ = [name for name in globals() if name.startswith("test_")]
