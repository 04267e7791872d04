"""The rotation state machine and expiry thresholds, sans-I/O with injected time."""

from __future__ import annotations

import datetime as dt

import pytest

from tapproof.errors import ConfigError
from tapproof.pki import expiry, rotation
from tapproof.store.base import CAServerRecord, CertificateRecord, HostRecord, IntermediateRecord, TrustRootRecord

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MIN = dt.timedelta(minutes=1)
A, B = "a" * 64, "b" * 64


def root(fp: str, state: str) -> TrustRootRecord:
    return TrustRootRecord(fp, "pem", state, T0)  # type: ignore[arg-type]


def inter(fp: str, key: str, root_fp: str, server: str = "s1") -> IntermediateRecord:
    return IntermediateRecord(fp, server, key, root_fp, "pem", T0, T0 + 90 * 24 * 60 * MIN, T0)


def server(name: str, intermediate: str, root_fp: str, bundle: str, seen: dt.datetime = T0) -> CAServerRecord:
    return CAServerRecord(name, intermediate, root_fp, bundle, seen)


def host(name: str, bundle: str, seen: dt.datetime | None = T0) -> HostRecord:
    return HostRecord(name, f"spiffe://td/host/{name}", T0, T0, None, "", "", seen, bundle)


def leaf(serial: str, name: str, root_fp: str, issued: dt.datetime, kind: str = "host") -> CertificateRecord:
    return CertificateRecord(
        serial,
        f"spiffe://td/host/{name}",
        kind,
        issued,
        issued + 60 * MIN,
        issued,
        "s1",
        name,
        None,
        root_fp,  # type: ignore[arg-type]
    )


def test_phases() -> None:
    assert rotation.phase([root(A, "active")]) == "steady"
    assert rotation.phase([root(A, "active"), root(B, "prepared")]) == "prepared"
    assert rotation.phase([root(A, "retiring"), root(B, "active")]) == "activated"
    assert rotation.phase([root(A, "active"), root(B, "active")]) == "broken"
    assert rotation.phase([]) == "broken"


def test_prepare_only_from_steady() -> None:
    assert rotation.check_prepare(rotation.Snapshot(T0, [root(A, "active")])).ok
    step = rotation.check_prepare(rotation.Snapshot(T0, [root(A, "active"), root(B, "prepared")]))
    assert "already under way" in step.error


def test_activate_waits_for_every_live_server_and_host() -> None:
    roots = [root(A, "active"), root(B, "prepared")]
    ints = [inter("i1", "k1", A), inter("i2", "k1", B)]
    snap = rotation.Snapshot(
        T0 + MIN,
        roots,
        ints,
        servers=[server("s1", "i1", A, f"{A},{B}")],
        hosts=[host("web1", f"{A},{B}"), host("web2", A), host("gone", A, seen=T0 - 60 * MIN)],
    )
    step = rotation.check_activate(snap)
    assert step.blockers == ("host web2 has not reported the new bundle yet",)  # "gone" is not live
    assert step.changes == {B: "active", A: "retiring"}
    assert step.expected == {B: "prepared", A: "active"}
    ok = rotation.check_activate(rotation.Snapshot(T0 + MIN, roots, ints, servers=snap.servers, hosts=[host("w", B)]))
    assert ok.ok


def test_activate_names_a_server_without_an_intermediate_under_the_new_root() -> None:
    roots = [root(A, "active"), root(B, "prepared")]
    snap = rotation.Snapshot(T0, roots, [inter("i1", "k1", A)], servers=[server("s2", "i1", A, A)])
    blockers = rotation.check_activate(snap).blockers
    assert any("does not trust the new root" in b for b in blockers)
    assert any("sign-intermediate" in b for b in blockers)
    assert "prepare" in rotation.check_activate(rotation.Snapshot(T0, [root(A, "active")])).error


def test_retire_waits_for_the_newest_certificate_of_each_identity() -> None:
    roots = [root(A, "retiring"), root(B, "active")]
    certs_ = [
        leaf("01", "web1", A, T0),
        leaf("02", "web1", B, T0 + MIN),  # web1 moved on: its old certificate does not block
        leaf("03", "web2", A, T0),  # web2 did not
        leaf("04", "admin", A, T0 + MIN, kind="admin"),  # admin certificates are re-issued on demand
    ]
    snap = rotation.Snapshot(T0 + 2 * MIN, roots, certificates=certs_, servers=[server("s1", "i2", B, B)])
    step = rotation.check_retire(snap)
    assert len(step.blockers) == 1
    assert "web2" in step.blockers[0]
    assert step.changes == {A: None}
    stale_server = rotation.Snapshot(T0, roots, servers=[server("s9", "i1", A, A)])
    assert "s9" in rotation.check_retire(stale_server).blockers[0]
    assert "activate first" in rotation.check_retire(rotation.Snapshot(T0, [root(A, "active")])).error
    # a certificate issued before schema v2 recorded roots (root "") counts as under the old root
    unrecorded = rotation.Snapshot(T0 + 2 * MIN, roots, certificates=[leaf("05", "web3", "", T0)])
    assert [b for b in rotation.check_retire(unrecorded).blockers if "web3" in b and "unrecorded" in b]


@pytest.mark.parametrize(
    ("elapsed", "here", "pending", "action", "warn"),
    [
        (10, True, False, "none", False),
        (46, True, False, "sign-now", False),
        (46, False, False, "request", False),
        (46, False, True, "wait", False),
        (80, False, True, "wait", True),
    ],
)
def test_intermediate_rotates_at_half_life(elapsed: int, here: bool, pending: bool, action: str, warn: bool) -> None:
    nb, na = T0, T0 + dt.timedelta(days=90)
    now = T0 + dt.timedelta(days=elapsed)
    thr = expiry.parse_warn("25%").for_kind("intermediate")
    plan = rotation.intermediate_action(
        now=now,
        not_before=nb,
        not_after=na,
        root_key_here=here,
        request_pending=pending,
        warn_reached=thr.reached(nb, na, now),
    )
    assert (plan.action, plan.warn) == (action, warn)


def test_expiry_thresholds() -> None:
    pol = expiry.parse_warn("25%,root=365d")
    nb, na = T0, T0 + dt.timedelta(days=3650)
    assert not pol.for_kind("root").reached(nb, na, na - dt.timedelta(days=400))
    assert pol.for_kind("root").reached(nb, na, na - dt.timedelta(days=300))
    assert pol.for_kind("leaf").reached(T0, T0 + 60 * MIN, T0 + 50 * MIN)
    assert not pol.for_kind("leaf").reached(T0, T0 + 60 * MIN, T0 + 40 * MIN)
    assert pol.for_kind("leaf").reached(T0, T0 + 60 * MIN, T0 + 61 * MIN)  # expired
    for bad in ("", "150%", "x%", "leafs=1h", "soon"):
        with pytest.raises(ConfigError, match="--expiry-warn"):
            expiry.parse_warn(bad)
