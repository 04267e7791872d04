"""Conformance of the CA-state part of the Store (schema v2), on SQLite and on PostgreSQL.

Per-server intermediates, signing requests, server heartbeats, the root a
certificate chains to, the bundle a host holds, and the compare-and-set root
transitions a rotation step makes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from tapproof.errors import Conflict, NotFound
from tapproof.store import open_store
from tapproof.store.base import CARequestRecord, CAServerRecord, IntermediateRecord, Store
from tests.store.conformance import HOUR, MIN, T0, cert, enroll, root, run_threads


def inter(fp: str, server: str, root_fp: str, *, created: dt.datetime = T0) -> IntermediateRecord:
    """An intermediate record for tests."""
    return IntermediateRecord(
        fingerprint=fp * 64,
        server=server,
        key_id="k" + server,
        root=root_fp * 64,
        cert_pem=f"pem-{fp}",
        not_before=created - MIN,
        not_after=created + 90 * 24 * HOUR,
        created_at=created,
    )


def test_intermediates_per_server_oldest_first(store: Store) -> None:
    store.add_intermediate(inter("b", "s1", "r", created=T0 + MIN))
    store.add_intermediate(inter("a", "s2", "r", created=T0))
    store.add_intermediate(inter("c", "s1", "q", created=T0 + 2 * MIN))
    assert [i.fingerprint[0] for i in store.list_intermediates()] == ["a", "b", "c"]
    assert [i.fingerprint[0] for i in store.list_intermediates("s1")] == ["b", "c"]
    assert store.list_intermediates("s1")[1] == inter("c", "s1", "q", created=T0 + 2 * MIN)
    assert store.list_intermediates("nobody") == []
    with pytest.raises(Conflict):
        store.add_intermediate(inter("a", "s3", "r"))


def test_ca_requests_queue(store: Store) -> None:
    r1 = CARequestRecord("k1" * 32, "s2", "csr-1", T0 + MIN)
    r2 = CARequestRecord("k2" * 32, "s3", "csr-2", T0)
    store.add_ca_request(r1)
    store.add_ca_request(r2)
    assert store.list_ca_requests() == [r2, r1]
    with pytest.raises(Conflict):
        store.add_ca_request(dataclasses.replace(r1, server="other"))
    store.remove_ca_request(r2.key_id)
    assert store.list_ca_requests() == [r1]
    with pytest.raises(NotFound):
        store.remove_ca_request(r2.key_id)


def test_ca_server_heartbeat_upserts(store: Store) -> None:
    s1 = CAServerRecord("s1", "i" * 64, "r" * 64, "r" * 64, T0)
    store.heartbeat_ca_server(s1)
    store.heartbeat_ca_server(CAServerRecord("s0", "j" * 64, "r" * 64, "r" * 64, T0))
    later = CAServerRecord("s1", "x" * 64, "q" * 64, "r" * 64 + "," + "q" * 64, T0 + MIN)
    store.heartbeat_ca_server(later)
    got = store.list_ca_servers()
    assert [s.name for s in got] == ["s0", "s1"]
    assert got[1] == later


def test_transition_moves_roots_atomically(store: Store) -> None:
    store.add_trust_root(root("a", T0, "active"))
    store.add_trust_root(root("b", T0 + MIN, "prepared"))
    a, b = "a" * 64, "b" * 64
    store.transition_trust_roots({a: "active", b: "prepared"}, {a: "retiring", b: "active"})
    assert [(r.fingerprint[0], r.state) for r in store.list_trust_roots()] == [("a", "retiring"), ("b", "active")]
    # a stale view changes nothing
    with pytest.raises(Conflict):
        store.transition_trust_roots({a: "active", b: "prepared"}, {a: "retiring", b: "active"})
    with pytest.raises(Conflict):
        store.transition_trust_roots({"c" * 64: "active"}, {a: None})
    assert len(store.list_trust_roots()) == 2
    store.transition_trust_roots({a: "retiring", b: "active"}, {a: None})
    assert [(r.fingerprint[0], r.state) for r in store.list_trust_roots()] == [("b", "active")]


def test_concurrent_transitions_exactly_one_wins(store: Store) -> None:
    store.add_trust_root(root("a", T0, "active"))
    store.add_trust_root(root("b", T0 + MIN, "prepared"))
    a, b = "a" * 64, "b" * 64
    wins: list[int] = []

    def activate(i: int) -> None:
        try:
            store.transition_trust_roots({a: "active", b: "prepared"}, {a: "retiring", b: "active"})
            wins.append(i)
        except Conflict:
            pass

    run_threads(8, activate)
    assert len(wins) == 1
    assert [r.state for r in store.list_trust_roots()] == ["retiring", "active"]


def test_certificate_root_and_unexpired(store: Store) -> None:
    store.record_certificate(dataclasses.replace(cert("01", "web1"), root="r" * 64))
    store.record_certificate(cert("02", "web2", not_after=T0 + 2 * HOUR))
    store.record_certificate(cert("03", "web3", not_after=T0 + MIN))
    store.record_certificate(cert("04", "web4", revoked_at=T0))
    assert store.get_certificate("01").root == "r" * 64
    assert store.get_certificate("02").root == ""
    assert [c.serial for c in store.unexpired_certificates(T0 + 2 * MIN)] == ["01", "02"]
    assert [c.serial for c in store.unexpired_certificates(T0 + HOUR)] == ["02"]


def test_host_bundle_is_recorded(store: Store) -> None:
    enroll(store, "web1", "01")
    assert store.get_host("web1").bundle == ""
    store.update_host_seen("web1", T0 + MIN, bundle="a,b")
    store.update_host_seen("web1", T0 + 2 * MIN, advertise="10.0.0.1:7444")
    host = store.get_host("web1")
    assert (host.bundle, host.advertise, host.last_seen) == ("a,b", "10.0.0.1:7444", T0 + 2 * MIN)
    with pytest.raises(NotFound):
        store.update_host_seen("nope", T0, bundle="a")


def test_add_trust_root_if_is_a_compare_and_set(store: Store) -> None:
    store.add_trust_root(root("a", T0, "active"))
    a = "a" * 64
    store.add_trust_root_if(root("b", T0 + MIN, "prepared"), {a: "active"})
    assert [(r.fingerprint[0], r.state) for r in store.list_trust_roots()] == [("a", "active"), ("b", "prepared")]
    with pytest.raises(Conflict):  # a stale view: b is there now
        store.add_trust_root_if(root("c", T0 + MIN, "prepared"), {a: "active"})
    with pytest.raises(Conflict):  # a root that is not there
        store.add_trust_root_if(
            root("c", T0 + MIN, "prepared"), {a: "active", "b" * 64: "prepared", "d" * 64: "active"}
        )
    assert len(store.list_trust_roots()) == 2


def test_concurrent_prepares_leave_one_prepared_root(store: Store, db_url: str) -> None:
    """Eight preparers, each on its own connection pool (as separate processes would be): one wins."""
    store.add_trust_root(root("a", T0, "active"))
    stores = [open_store(db_url) for _ in range(8)]
    wins: list[int] = []
    try:

        def prepare(i: int) -> None:
            try:
                stores[i].add_trust_root_if(root(f"{i:x}" * 64, T0 + MIN, "prepared"), {"a" * 64: "active"})
                wins.append(i)
            except Conflict:
                pass

        run_threads(8, prepare)
    finally:
        for s in stores:
            s.close()
    assert len(wins) == 1
    assert sorted(r.state for r in store.list_trust_roots()) == ["active", "prepared"]
