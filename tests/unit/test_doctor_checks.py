"""tapproof doctor's sans-I/O checks, with injected times and observations."""

from __future__ import annotations

import datetime as dt

import pytest

from tapproof.doctor import Report, Status, checks
from tapproof.doctor.checks import ApiProbe, Validity
from tapproof.pki import certs

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def leaf(issued: dt.datetime = T0, life: dt.timedelta = HOUR) -> Validity:
    return Validity("spiffe://example.org/host/a", issued - certs.BACKDATE, issued + life, issued)


def probe(before: dt.datetime, after: dt.datetime, **kw: object) -> ApiProbe:
    return ApiProbe("127.0.0.1:7443", "done", status=200, local_before=before, local_after=after, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now", "status"),
    [
        (T0, Status.OK),
        (T0 + HOUR * 0.74, Status.OK),  # 26% left: renewal due at 50%, not yet overdue
        (T0 + HOUR * 0.8, Status.WARN),  # 20% left: renewal overdue
        (T0 + HOUR, Status.FAIL),  # expired
        (T0 - certs.BACKDATE - dt.timedelta(seconds=1), Status.FAIL),  # clock behind notBefore
    ],
)
def test_leaf_certificate_thresholds(now: dt.datetime, status: Status) -> None:
    c = checks.leaf_certificate(leaf(), now)
    assert c.status is status, c
    assert (c.fix == "") == (status is Status.OK)


def test_expired_leaf_says_how_to_reenroll() -> None:
    c = checks.leaf_certificate(leaf(), T0 + 2 * HOUR)
    assert "expired 1h ago" in c.summary
    assert "tapproof agent enroll" in c.fix


@pytest.mark.parametrize(
    ("server_offset", "status"),
    [
        (dt.timedelta(0), Status.OK),
        (dt.timedelta(seconds=1.5), Status.OK),
        (dt.timedelta(seconds=-3), Status.WARN),
        (dt.timedelta(seconds=149), Status.WARN),
        (dt.timedelta(seconds=151), Status.FAIL),
        (dt.timedelta(minutes=-10), Status.FAIL),
    ],
)
def test_clock_skew_thresholds(server_offset: dt.timedelta, status: Status) -> None:
    before, after = T0, T0 + dt.timedelta(milliseconds=20)
    c = checks.clock_skew(probe(before, after, server_time=T0 + dt.timedelta(milliseconds=10) + server_offset))
    assert c.status is status, c
    assert c.details["skew_seconds"] == pytest.approx(server_offset.total_seconds(), abs=1e-6)
    assert c.details["uncertainty_seconds"] == pytest.approx(0.01)


def test_skew_within_uncertainty_is_not_reported() -> None:
    # 3 s apparent skew, but the request took 8 s: the server's time may be anywhere in that window
    before, after = T0, T0 + dt.timedelta(seconds=8)
    c = checks.clock_skew(probe(before, after, server_time=T0 + dt.timedelta(seconds=7)))
    assert c.status is Status.OK
    assert c.details["uncertainty_seconds"] == 4.0


def test_skew_falls_back_to_the_date_header_with_its_resolution() -> None:
    before, after = T0, T0 + dt.timedelta(milliseconds=2)
    c = checks.clock_skew(probe(before, after, server_date=T0 + dt.timedelta(seconds=60)))
    assert c.status is Status.WARN
    assert c.details["skew_seconds"] == pytest.approx(60.499, abs=0.002)
    assert c.details["uncertainty_seconds"] == pytest.approx(0.501)
    assert "behind" in c.summary
    no_time = checks.clock_skew(probe(before, after))
    assert no_time.status is Status.SKIP


def test_skew_not_measured_without_an_answer() -> None:
    assert checks.clock_skew(None).status is Status.SKIP


def test_ca_certificates() -> None:
    inter = Validity("CN=i", T0 - certs.BACKDATE, T0 + dt.timedelta(days=90), T0)
    assert checks.ca_certificate(inter, T0 + dt.timedelta(days=50), name="i", kind="intermediate").status is Status.OK
    late = checks.ca_certificate(inter, T0 + dt.timedelta(days=60), name="i", kind="intermediate")
    assert late.status is Status.WARN
    assert "rotate" in late.fix
    assert checks.ca_certificate(inter, T0 + dt.timedelta(days=91), name="i", kind="intermediate").status is (
        Status.FAIL
    )
    root = Validity("CN=r", T0 - certs.BACKDATE, T0 + dt.timedelta(days=3650), T0)
    assert checks.ca_certificate(root, T0 + dt.timedelta(days=2800), name="r", kind="root").status is Status.OK
    assert checks.ca_certificate(root, T0 + dt.timedelta(days=3000), name="r", kind="root").status is Status.WARN


def test_trust_bundle_freshness() -> None:
    root = Validity("CN=r", T0 - HOUR, T0 + dt.timedelta(days=3650), T0)
    old = Validity("CN=old", T0 - dt.timedelta(days=4000), T0 - dt.timedelta(days=1), T0 - dt.timedelta(days=4000))
    same = checks.trust_bundle([("aa", root)], ["aa"], T0, age=dt.timedelta(minutes=3))
    assert same.status is Status.OK
    assert "3m old" in same.summary
    assert checks.trust_bundle([("aa", root)], None, T0).status is Status.OK
    new_root = checks.trust_bundle([("aa", root)], ["aa", "bb"], T0)
    assert new_root.status is Status.WARN
    assert "1 root(s) this host does not trust yet" in new_root.summary
    retired = checks.trust_bundle([("aa", root), ("cc", root)], ["aa"], T0)
    assert retired.status is Status.WARN
    assert "retired" in retired.summary
    assert checks.trust_bundle([("dd", old)], ["dd"], T0).status is Status.FAIL


def test_server_api_outcomes() -> None:
    up = probe(T0, T0)
    down = ApiProbe("127.0.0.1:1", "connect", "connection refused")
    refused = ApiProbe("127.0.0.1:2", "tls", "handshake refused")
    assert checks.server_api([up], who="x").status is Status.OK
    partial = checks.server_api([up, down], who="x")
    assert partial.status is Status.WARN
    assert "127.0.0.1:1" in partial.summary
    none = checks.server_api([down], who="x")
    assert none.status is Status.FAIL
    assert "start the server" in none.fix
    bad_tls = checks.server_api([refused], who="x")
    assert bad_tls.status is Status.FAIL
    assert "revoked" in bad_tls.fix
    db_down = checks.server_api([ApiProbe("s:1", "done", status=503)], who="x")
    assert db_down.status is Status.FAIL
    assert "database" in db_down.summary
    assert checks.server_api([], who="x").status is Status.FAIL


def test_pq_group() -> None:
    assert checks.pq_group(ApiProbe("s:1", "done", group="X25519MLKEM768")).status is Status.OK
    assert checks.pq_group(ApiProbe("s:1", "done", group="X25519")).status is Status.FAIL
    assert checks.pq_group(None).status is Status.SKIP


INSTALLED = """-P PREROUTING ACCEPT
-P OUTPUT ACCEPT
-N TAPPROOF-OUTPUT
-N TAPPROOF-PREROUTING
-A PREROUTING -p tcp -j TAPPROOF-PREROUTING
-A OUTPUT -p tcp -j TAPPROOF-OUTPUT
-A TAPPROOF-OUTPUT -m mark --mark 0x7470 -j RETURN
-A TAPPROOF-OUTPUT -o lo -j RETURN
-A TAPPROOF-OUTPUT -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 7447
-A TAPPROOF-PREROUTING -p tcp -m tcp --dport 6379 -j REDIRECT --to-ports 7448
"""


def test_transparent_rules() -> None:
    good = checks.transparent_rules(INSTALLED, expected=True, transparent_port=7447, inbound_port=7448)
    assert good.status is Status.OK
    no_jump = INSTALLED.replace("-A OUTPUT -p tcp -j TAPPROOF-OUTPUT\n", "")
    missing = checks.transparent_rules(no_jump, expected=True, transparent_port=7447)
    assert missing.status is Status.FAIL
    assert "OUTPUT -> TAPPROOF-OUTPUT" in missing.summary
    wrong_port = checks.transparent_rules(INSTALLED, expected=True, transparent_port=9999, inbound_port=7448)
    assert wrong_port.status is Status.FAIL
    assert "9999" in wrong_port.summary
    flushed = checks.transparent_rules("-P OUTPUT ACCEPT\n", expected=True)
    assert flushed.status is Status.FAIL
    assert "restart the agent" in flushed.fix
    leftover = checks.transparent_rules(INSTALLED, expected=False)
    assert leftover.status is Status.WARN
    assert "--repair" in leftover.fix
    assert checks.transparent_rules("-P OUTPUT ACCEPT\n", expected=False).status is Status.OK
    assert checks.transparent_rules(None, expected=True, error="not root").status is Status.WARN
    assert checks.transparent_rules(None, expected=False, error="not root").status is Status.SKIP


def test_agent_health_and_listeners() -> None:
    assert checks.agent_health("127.0.0.1:7445", 200, "ok").status is Status.OK
    sick = checks.agent_health("127.0.0.1:7445", 503, "certificate expired")
    assert sick.status is Status.FAIL
    assert "certificate expired" in sick.summary
    gone = checks.agent_health("127.0.0.1:7445", 0, "", "connection refused")
    assert gone.status is Status.FAIL
    assert "systemctl start tapproof-agent" in gone.fix
    assert checks.listeners({"tunnel": ("127.0.0.1:7444", "")}).status is Status.OK
    closed = checks.listeners({"tunnel": ("127.0.0.1:7444", ""), "transparent": ("127.0.0.1:7447", "refused")})
    assert closed.status is Status.FAIL
    assert "transparent" in closed.summary
    assert checks.listeners({}).status is Status.SKIP


def test_report_exit_code_and_json() -> None:
    ok = checks.pq_group(ApiProbe("s:1", "done", group="X25519MLKEM768"))
    warn = checks.clock_skew(probe(T0, T0, server_time=T0 + dt.timedelta(seconds=10)))
    bad = checks.pq_group(ApiProbe("s:1", "done", group="X25519"))
    assert Report.of([ok, warn]).exit_code == 0
    report = Report.of([ok, warn, bad])
    assert report.exit_code == 1
    doc = report.to_json()
    assert doc["ok"] is False
    assert doc["counts"] == {"OK": 1, "WARN": 1, "FAIL": 1, "SKIP": 0}
    assert [c["status"] for c in doc["checks"]] == ["OK", "WARN", "FAIL"]
