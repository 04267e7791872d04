"""Faults longer than a certificate's lifetime: the control plane gone, and every process frozen.

Host certificates live 1 minute (the server's minimum; 5 more minutes of
backdating cover clock skew). Both fleets start when the module starts, so
their minute runs while the module's other tests run:

* ``outage``: server killed; agents ``a`` -> ``b`` keep serving until their
  certificates expire, a slow connection stays open across the expiry.
  Checked: new tunnels during the outage, ``/healthz`` 503 with the reason
  ``certificate expired`` once no valid certificate is left, no new handshake
  with an expired certificate (refused, reason ``expired``, logged and
  counted), what a live tunnel does across the expiry (it keeps running: TLS
  authenticates at the handshake only; revocation, idle timeout or either end
  closes it), and what happens when the server returns: the agent renews
  with its expired certificate (the server's renewal grace: the host's latest,
  unrevoked certificate, ``POST /v1/renew`` only) and is healthy again; the
  server logged and counted ``renew-after-expiry`` and refused every other
  route to the expired certificate; the superseded certificate cannot renew.
* ``frozen``: server and both agents SIGSTOPped for 65 s (> the 60 s lifetime,
  and > every timeout: handshake 5 s, API idle 30 s, sync 1 s), then
  SIGCONT: recovery with no manual step within 60 s.
* clock skew (``libfaketime`` on one agent): +-2 min works; +-2 h is refused
  at enrollment with reason ``clock-skew`` before the join token is spent, and
  at renewal (logged and counted).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapproof.control.client import APIClient
from tapproof.errors import APIError
from tapproof.tls import context
from tapproof.tls.credentials import Credentials, TrustBundle
from tests.battery.invariants import End, HashEcho, check_transfer, log_problems, scrape, stream
from tests.helpers import require
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIFETIME = "1m"
FREEZE = 65.0


@dataclasses.dataclass
class Fleet:
    """A server, a client agent with a route, a service agent and its echo service."""

    srv: procs.ServerProc
    a: procs.AgentProc
    b: procs.AgentProc
    echo: HashEcho
    t0: float = 0.0  # when the fault started (monotonic)

    def stop(self) -> None:
        for p in (self.a, self.b):
            p.proc.send_signal(signal.SIGCONT)
            p.stop()
        self.srv.proc.send_signal(signal.SIGCONT)
        self.srv.stop()
        self.echo.close()


def _fleet(tmp: Path, lifetime: str = LIFETIME) -> Fleet:
    echo = HashEcho()
    srv = procs.start_server(tmp / "srv", leaf_ttl=lifetime)
    b = procs.start_agent(tmp / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{echo.port}")
    a = procs.start_agent(tmp / "a", srv.token("a"), "--route", "127.0.0.1:0=echo@b")
    procs.wait_for(lambda: "b" in a.status()["registry_hosts"], 15, "a to learn b")
    return Fleet(srv, a, b, echo)


def _not_after(agent: procs.AgentProc) -> dt.datetime:
    return dt.datetime.fromisoformat(agent.status()["certificate"]["not_after"])


def _health(agent: procs.AgentProc) -> tuple[int, str]:
    code, body = agent.admin_get("/healthz")
    return code, str(json.loads(body).get("reason"))


def _roundtrip_ok(agent: procs.AgentProc, size: int = 1 << 20) -> bool:
    end = stream(agent.route(), size, timeout=5)
    return end.clean_eof and end.error is None and end.received == size


def _recover(f: Fleet, timeout: float) -> float:
    """Seconds until both agents are healthy and a tunnel a -> b works (no manual step).

    Meanwhile ``/healthz`` must name the expiry while it is not healthy; once both are, a tunnel must work.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        health = [_health(p) for p in (f.a, f.b)]
        if all(code == 200 for code, _ in health):
            assert _roundtrip_ok(f.a), "healthy, but no tunnel works"
            return time.monotonic() - t0
        for code, reason in health:
            assert code == 200 or "expired" in reason, f"unhealthy for an unexpected reason: {reason}"
        assert time.monotonic() < deadline, f"not recovered within {timeout}s: {health}"
        time.sleep(0.2)


def _server_metric(srv: procs.ServerProc, name: str) -> float:
    return sum(v for k, v in scrape(f"http://{srv.metrics}/metrics").items() if k.split("{")[0] == name)


def _expired_client(srv: procs.ServerProc, saved: Path) -> APIClient:
    """An API client presenting the certificate saved in ``saved`` (expired by now)."""
    creds = Credentials.load(saved / "key.pem", saved / "cert.pem")
    bundle = TrustBundle.from_pem((saved / "bundle.pem").read_bytes())
    return APIClient([srv.listen], "example.org", lambda: context.client_context(creds, bundle), timeout=5)


@dataclasses.dataclass
class Outage:
    """The outage fleet and its slow live connection."""

    fleet: Fleet
    expiry: dt.datetime
    live: dict[str, End]
    live_stop: threading.Event
    live_thread: threading.Thread
    saved_a: Path  # a copy of a's key, certificate and bundle from before the expiry
    received_at_expiry: int = 0


@pytest.fixture(scope="module", autouse=True)
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    """Start the outage fleet, open the slow connection, kill the server (module start)."""
    f = _fleet(tmp_path_factory.mktemp("outage"))
    live: dict[str, End] = {}
    stop = threading.Event()
    t = threading.Thread(
        target=lambda: live.update(end=stream(f.a.route(), 1 << 40, chunk=16 << 10, interval=0.2, stop=stop)),
        daemon=True,
    )
    t.start()
    f.srv.kill()
    f.t0 = time.monotonic()
    saved = tmp_path_factory.mktemp("saved-a")
    for name in ("key.pem", "cert.pem", "bundle.pem"):
        shutil.copy(f.a.data_dir / name, saved / name)
    o = Outage(f, max(_not_after(f.a), _not_after(f.b)), live, stop, t, saved)
    try:
        yield o
    finally:
        stop.set()
        f.stop()


@pytest.fixture(scope="module", autouse=True)
def frozen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Start the frozen fleet and SIGSTOP all three processes (module start)."""
    f = _fleet(tmp_path_factory.mktemp("frozen"))
    assert _roundtrip_ok(f.a)
    for p in (f.srv.proc, f.a.proc, f.b.proc):
        p.send_signal(signal.SIGSTOP)
    f.t0 = time.monotonic()
    try:
        yield f
    finally:
        f.stop()


def _faketime_env(offset: str) -> dict[str, str]:
    """LD_PRELOAD libfaketime (Debian ``faketime``): the wall clock shifted by ``offset``, monotonic untouched."""
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    require(bool(libs), "needs libfaketime (Debian package faketime)")
    return {"LD_PRELOAD": libs[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}


@pytest.fixture(scope="module")
def skew_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A server and a service agent on the true clock, for the skewed agents to talk to."""
    f = _fleet(tmp_path_factory.mktemp("skew"), lifetime="1h")  # an agent 2 min ahead needs more than 1m
    try:
        yield f
    finally:
        f.stop()


@pytest.mark.parametrize("offset", ["+2m", "-2m"])
def test_clock_skew_of_two_minutes_works(
    skew_fleet: Fleet, offset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = skew_fleet.srv.token(f"skew{'ahead' if offset[0] == '+' else 'behind'}")
    for k, v in _faketime_env(offset).items():
        monkeypatch.setenv(k, v)  # for the agent only: the admin CLI above ran on the true clock
    agent = procs.start_agent(tmp_path / "skewed", token, "--route", "127.0.0.1:0=echo@b")
    try:
        procs.wait_for(lambda: "b" in agent.status()["registry_hosts"], 15, "the skewed agent to learn b")
        assert _health(agent)[0] == 200
        assert _roundtrip_ok(agent)
    finally:
        assert agent.stop() == 0
    assert not log_problems(agent.log_path.read_text())


@pytest.mark.parametrize("offset", ["+2h", "-2h"])
def test_clock_skew_of_two_hours_is_refused(
    skew_fleet: Fleet, offset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = f"skew2h{'ahead' if offset[0] == '+' else 'behind'}"
    token = skew_fleet.srv.token(host)
    with monkeypatch.context() as m:
        for k, v in _faketime_env(offset).items():
            m.setenv(k, v)
        with pytest.raises(RuntimeError) as info:
            procs.start_agent(tmp_path / "skewed", token)
    msg = str(info.value)
    assert "exited with 1" in msg
    assert "Traceback" not in msg
    word = "ahead of" if offset[0] == "+" else "behind"
    assert f"clock-skew at enrollment: this host's clock is 2h {word} the control plane's" in msg, msg
    assert "--max-clock-skew" in msg
    assert "NTP" in msg
    lines = [e for e in procs.read_events(tmp_path / "skewed.log") if e.get("event") == "clock-skew"]
    assert len(lines) == 1
    assert lines[0]["reason"] == "clock-skew"
    assert abs(abs(lines[0]["skew_seconds"]) - 7200) < 30
    assert not (tmp_path / "skewed" / "cert.pem").exists()
    # refused before the join secret was sent: the same token still enrolls an agent with a true clock
    agent = procs.start_agent(tmp_path / "fixed", token)
    assert agent.status()["certificate"]["serial"]
    assert agent.stop() == 0


def test_clock_skew_at_renewal_is_refused_and_counted(
    skew_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enrolled on a true clock, restarted 2 h ahead: its certificate looks expired, the renewal answer
    shows the skew, and the agent refuses it (reason ``clock-skew``, logged and counted) rather than
    swapping in a certificate its clock cannot use."""
    agent = procs.start_agent(tmp_path / "drift", skew_fleet.srv.token("skewdrift"))
    assert agent.stop() == 0
    for k, v in _faketime_env("+2h").items():
        monkeypatch.setenv(k, v)
    agent = procs.start_agent(tmp_path / "drift", None)
    try:
        line = procs.wait_for(lambda: agent.events("clock-skew"), 20, "a clock-skew refusal at renewal")[0]
        assert line["reason"] == "clock-skew", line
        assert line["at"] == "renewal", line
        assert agent.metric("tapproof_agent_clock_skew_refusals_total", at="renewal") >= 1
        assert agent.metric("tapproof_agent_clock_skew_seconds") > 7000
        failed = agent.events("renewal-failed")
        assert failed, "no renewal-failed line"
        assert "clock-skew" in failed[0]["detail"], failed
        assert _health(agent)[0] == 503
    finally:
        agent.stop()
    assert not log_problems(agent.log_path.read_text())


def test_outage_serves_until_expiry_then_unhealthy(outage: Outage) -> None:
    f = outage.fleet
    a, b = f.a, f.b
    procs.wait_for(lambda: a.metric("tapproof_agent_control_plane_up") == 0, 10, "a to see the outage")
    # before the expiry: new tunnels work on the current certificates and the cached policy/registry
    if dt.datetime.now(dt.UTC) < outage.expiry - dt.timedelta(seconds=3):
        assert _roundtrip_ok(a)
        assert _health(a)[0] == 200
    left = (outage.expiry - dt.datetime.now(dt.UTC)).total_seconds()
    assert left < 65, "certificates outlive the test lifetime"
    time.sleep(max(0.0, left))
    received_at_expiry = outage.live["end"].received if "end" in outage.live else None
    t_exp = time.monotonic()
    _code, reason = procs.wait_for(lambda: (h := _health(a))[0] == 503 and h, 5, "a unhealthy after expiry")
    unhealthy_after = time.monotonic() - t_exp
    assert "expired" in reason, reason
    assert _health(b)[0] == 503

    # no new handshake with an expired certificate: refused, with the reason, logged and counted
    refused_before = a.metric("tapproof_agent_refusals_total", direction="outbound", reason="expired")
    end = stream(a.route(), 1 << 20, timeout=10)
    assert end.error is not None, "a new tunnel worked with expired certificates"
    procs.wait_for(
        lambda: any(e.get("reason") == "expired" for e in a.events("tunnel-refused") + b.events("tunnel-refused")),
        5,
        "an 'expired' refusal line",
    )
    counted = a.metric("tapproof_agent_refusals_total", direction="outbound", reason="expired") - refused_before
    counted += b.metric("tapproof_agent_refusals_total", direction="inbound", reason="expired")
    assert counted >= 1

    # the live tunnel opened before the expiry keeps running after it (authentication is per handshake)
    time.sleep(2)
    assert outage.live_thread.is_alive()
    outage.live_stop.set()
    outage.live_thread.join(30)
    live = outage.live["end"]
    service = next(e for e in f.echo.ends if e.received == live.sent)
    assert check_transfer(live, service) == "complete"
    assert received_at_expiry is None or live.received > received_at_expiry
    print(f"outage: unhealthy {unhealthy_after:.2f}s after expiry; live tunnel carried {live.received} B across it")

    # the server returns: the agent renews with its expired certificate (renewal grace) and is healthy again;
    # it must never report healthy while it cannot serve
    saved = outage.saved_a
    f.srv.restart()
    recovered = _recover(f, timeout=20)
    assert not log_problems(a.log_path.read_text()), log_problems(a.log_path.read_text())
    print(f"outage: recovered {recovered:.2f}s after the server returned")

    # the server accepted each expired certificate for renewal only: logged, counted, audited
    after = [e for e in procs.read_events(f.srv.log_path) if e.get("event") == "renew-after-expiry"]
    assert {e["host"] for e in after} >= {"a", "b"}, after
    assert _server_metric(f.srv, "tapproof_server_renewals_after_expiry_total") >= 2
    # ...and refused every other route to it (the agent polls the policy before it renews)
    refused = [e for e in procs.read_events(f.srv.log_path) if e.get("event") == "api-refused"]
    assert any(e.get("reason") == "expired" and e.get("path") != "/v1/renew" for e in refused), refused

    # the superseded (old, expired) certificate: no other route, and no second renewal
    old = _expired_client(f.srv, saved)
    with pytest.raises(APIError) as info:
        old.get("/v1/policy")
    assert (info.value.status, info.value.code) == (403, "expired")
    with pytest.raises(APIError) as info:
        old.post("/v1/renew", {"csr": "x"})
    assert info.value.status == 403, info.value
    assert "superseded" in f.srv.log()


def test_sigstop_everything_longer_than_every_lifetime(frozen: Fleet) -> None:
    f = frozen
    left = f.t0 + FREEZE - time.monotonic()
    time.sleep(max(0.0, left))
    for p in (f.srv.proc, f.b.proc, f.a.proc):
        p.send_signal(signal.SIGCONT)
    t_cont = time.monotonic()
    for p in (f.srv.proc, f.a.proc, f.b.proc):
        assert p.poll() is None, "a process died while stopped"
    _recover(f, timeout=60)
    recovered = time.monotonic() - t_cont
    for p in (f.srv, f.a, f.b):
        problems = log_problems(p.log_path.read_text())
        assert not problems, problems
    after = [e for e in procs.read_events(f.srv.log_path) if e.get("event") == "renew-after-expiry"]
    assert {e["host"] for e in after} >= {"a", "b"}, after
    print(f"sigstop {FREEZE:.0f}s: recovered {recovered:.2f}s after SIGCONT")
    assert recovered <= 60
