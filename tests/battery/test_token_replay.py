"""Join-token replay through the real server process: exactly one success, every refusal with its reason.

Each join string is redeemed by the real enrollment code (``agent.enroll``:
pinned root, bootstrap client certificate, CSR bound to it) against a real
``tapproof server``: in sequence, 50 times at once, after expiry, and from
another trust domain. For every refusal: the agent gets the reason, the
server logs one ``enroll-refused`` line with it and counts it, and nothing
is written to the refused agent's data dir.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tapproof.agent.enroll import enroll
from tapproof.agent.state import AgentPaths
from tapproof.control.joinstring import JoinString, parse
from tapproof.errors import APIError, PeerReason, PeerRejected, TapproofError
from tests.battery.test_client_certs import server_metric_at
from tests.integration import procs
from tests.integration.procs import ServerProc

pytestmark = [pytest.mark.integration]

REFUSED = "tapproof_server_enrollments_refused_total"
PARALLEL = 50
EXPIRY_TTL = 10.0  # the shortest TTL the server allows


def refused(srv: ServerProc, reason: str) -> float:
    """The server's count of enrollments refused for ``reason``."""
    return server_metric_at(srv.metrics, REFUSED, reason=reason)


def refusal_lines(srv: ServerProc, reason: str) -> int:
    """The server's ``enroll-refused`` log lines with ``reason``."""
    return sum(
        1 for e in procs.read_events(srv.log_path) if e.get("event") == "enroll-refused" and e.get("reason") == reason
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, ServerProc, str, float]]:
    """Server A (example.org), server B (other.org), and a short-lived token of A made first
    (so that its expiry runs out while the other tests run)."""
    tmp = tmp_path_factory.mktemp("replay")
    a = procs.start_server(tmp / "a", "example.org")
    try:
        b = procs.start_server(tmp / "b", "other.org")
        try:
            short = a.admin("token", "create", "--host", "late", "--ttl", f"{int(EXPIRY_TTL)}s").strip()
            yield a, b, short, time.monotonic() + EXPIRY_TTL
        finally:
            b.stop()
    finally:
        a.stop()


def test_in_sequence(servers: tuple[ServerProc, ServerProc, str, float], tmp_path: Path) -> None:
    srv = servers[0]
    join = srv.token("seq")
    before, lines = refused(srv, "used-token"), refusal_lines(srv, "used-token")
    assert enroll(tmp_path / "first", join).spiffe_id.name == "seq"
    with pytest.raises(APIError) as ei:
        enroll(tmp_path / "second", join)
    assert ei.value.status == 403
    assert ei.value.code == "used-token"
    assert not (tmp_path / "second").exists()
    assert refused(srv, "used-token") == before + 1
    assert refusal_lines(srv, "used-token") == lines + 1


def test_fifty_at_once(servers: tuple[ServerProc, ServerProc, str, float], tmp_path: Path) -> None:
    srv = servers[0]
    join = srv.token("race50")
    before, lines = refused(srv, "used-token"), refusal_lines(srv, "used-token")
    gate = threading.Barrier(PARALLEL)
    results: list[object] = [None] * PARALLEL
    winners: list[bytes] = []  # the SPKI of every certificate any attempt got (a retry included)
    retried: list[str] = []  # attempts that got no answer and were repeated (same pending key)

    def one(i: int) -> None:
        gate.wait(30)
        try:
            creds = procs.retry_unanswered(lambda: enroll(tmp_path / f"a{i}", join), retried)
            winners.append(creds.leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
            results[i] = "ok"
        except TapproofError as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads)
    assert results.count("ok") == 1, results
    assert len(set(winners)) == 1, "two different keys got a certificate for one token"
    codes = [r.code if isinstance(r, APIError) else repr(r) for r in results if r != "ok"]
    assert codes == ["used-token"] * (PARALLEL - 1)
    assert [i for i in range(PARALLEL) if AgentPaths(tmp_path / f"a{i}").enrolled()] == [results.index("ok")]
    for i, r in enumerate(results):  # a refused agent's dir holds nothing (it may exist, empty, after a retry)
        d = tmp_path / f"a{i}"
        assert r == "ok" or not d.exists() or not any(d.iterdir()), sorted(d.iterdir())
    enrolled = [
        e for e in procs.read_events(srv.log_path) if e.get("event") == "enrolled" and e.get("host") == "race50"
    ]
    assert len(enrolled) == 1, enrolled  # the server redeemed the token once (a same-key repeat logs enroll-repeated)
    # a lost answer may have been a refusal the retry got again: counted once per refusal the server made
    counted, logged = refused(srv, "used-token") - before, refusal_lines(srv, "used-token") - lines
    assert PARALLEL - 1 <= counted <= PARALLEL - 1 + len(retried), (counted, retried)
    assert logged == counted
    print(
        f"{PARALLEL} concurrent redemptions of one token: 1 success, {PARALLEL - 1} used-token"
        f" ({len(retried)} attempts repeated after no answer)"
    )


def test_from_another_trust_domain(servers: tuple[ServerProc, ServerProc, str, float], tmp_path: Path) -> None:
    a, b, _short, _ = servers
    js = parse(a.token("cross"))
    b_js = parse(b.token("probe"))
    b_unknown = refused(b, "unknown-token")
    # 1. A's join string pointed at B: B's chain does not end at A's pinned root; the secret is never sent
    redirected = JoinString(b_js.servers, js.trust_domain, js.fingerprint, js.secret).encode()
    with pytest.raises(PeerRejected) as pe:
        enroll(tmp_path / "redirected", redirected)
    assert pe.value.reason is PeerReason.FINGERPRINT_MISMATCH
    # 2. A's secret handed to B under B's own pin: B has no such token
    smuggled = JoinString(b_js.servers, b_js.trust_domain, b_js.fingerprint, js.secret).encode()
    with pytest.raises(APIError) as ei:
        enroll(tmp_path / "smuggled", smuggled)
    assert ei.value.code == "unknown-token"
    assert refused(b, "unknown-token") == b_unknown + 1  # case 1 never reached B's enrollment
    assert refusal_lines(b, "unknown-token") == 1
    assert not (tmp_path / "redirected").exists()
    assert not (tmp_path / "smuggled").exists()
    # the token is still good where it belongs, once
    assert enroll(tmp_path / "home", js.encode()).spiffe_id.trust_domain == "example.org"
    with pytest.raises(APIError):
        enroll(tmp_path / "again", js.encode())


def test_after_expiry(servers: tuple[ServerProc, ServerProc, str, float], tmp_path: Path) -> None:
    srv, _b, short, expires = servers
    time.sleep(max(0.0, expires - time.monotonic()) + 1.0)
    before, lines = refused(srv, "expired-token"), refusal_lines(srv, "expired-token")
    with pytest.raises(APIError) as ei:
        enroll(tmp_path / "late", short)
    assert ei.value.code == "expired-token"
    assert not (tmp_path / "late").exists()
    assert refused(srv, "expired-token") == before + 1
    assert refusal_lines(srv, "expired-token") == lines + 1
