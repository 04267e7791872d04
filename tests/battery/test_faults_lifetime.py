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
  closes it), and what happens when the server returns.
* ``frozen``: server and both agents SIGSTOPped for 65 s (> the 60 s lifetime,
  and > every timeout: handshake 5 s, API idle 30 s, sync 1 s), then
  SIGCONT: recovery with no manual step within 60 s.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.battery.invariants import End, HashEcho, check_transfer, log_problems, stream
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


def _fleet(tmp: Path) -> Fleet:
    echo = HashEcho()
    srv = procs.start_server(tmp / "srv", leaf_ttl=LIFETIME)
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


def _recover_or_refused(agent: procs.AgentProc, since: dt.datetime, timeout: float) -> bool:
    """True once the agent is healthy and a tunnel works; False once the server refused its expired certificate.

    Meanwhile ``/healthz`` must never say healthy without a working tunnel, and must name the expiry.
    """
    deadline = time.monotonic() + timeout
    while True:
        code, reason = _health(agent)
        if code == 200:
            assert _roundtrip_ok(agent), "healthy, but no tunnel works"
            return True
        assert "expired" in reason, f"unhealthy for an unexpected reason: {reason}"
        refused = [
            e
            for e in agent.events("renewal-failed")
            if dt.datetime.fromisoformat(e["ts"]) >= since and "certificate expired" in str(e.get("detail"))
        ]
        if refused:
            return False
        assert time.monotonic() < deadline, f"neither recovered nor refused within {timeout}s: {reason}"
        time.sleep(0.5)


@dataclasses.dataclass
class Outage:
    """The outage fleet and its slow live connection."""

    fleet: Fleet
    expiry: dt.datetime
    live: dict[str, End]
    live_stop: threading.Event
    live_thread: threading.Thread
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
    o = Outage(f, max(_not_after(f.a), _not_after(f.b)), live, stop, t)
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
    f = _fleet(tmp_path_factory.mktemp("skew"))
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
    token = skew_fleet.srv.token(f"skew2h{'ahead' if offset[0] == '+' else 'behind'}")
    for k, v in _faketime_env(offset).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError) as info:
        procs.start_agent(tmp_path / "skewed", token)
    msg = str(info.value)
    assert "exited with" in msg
    assert any(w in msg for w in ("expired", "not valid before", "not yet valid")), msg
    assert "Traceback" not in msg


@pytest.mark.xfail(strict=True, reason="no explicit clock-skew check yet at enrollment/renewal (see the docs)")
def test_clock_skew_error_is_explicit(skew_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = skew_fleet.srv.token("skewexplicit")
    for k, v in _faketime_env("+2h").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError) as info:
        procs.start_agent(tmp_path / "skewed", token)
    assert "clock" in str(info.value)


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

    # the server returns: the agent must never report healthy while it cannot serve
    f.srv.restart()
    t_back = time.monotonic()
    recovered = _recover_or_refused(a, since=dt.datetime.now(dt.UTC), timeout=20)
    assert not log_problems(a.log_path.read_text()), log_problems(a.log_path.read_text())
    if not recovered:
        pytest.xfail(
            "known gap: an agent whose certificate expired cannot renew (the server refuses an expired client "
            "certificate); it reports unhealthy ('certificate expired') and needs a new join token"
        )
    print(f"outage: recovered {time.monotonic() - t_back:.2f}s after the server returned")


def test_sigstop_everything_longer_than_every_lifetime(frozen: Fleet) -> None:
    f = frozen
    left = f.t0 + FREEZE - time.monotonic()
    time.sleep(max(0.0, left))
    for p in (f.srv.proc, f.b.proc, f.a.proc):
        p.send_signal(signal.SIGCONT)
    t_cont = time.monotonic()
    for p in (f.srv.proc, f.a.proc, f.b.proc):
        assert p.poll() is None, "a process died while stopped"
    ok = _recover_or_refused(f.a, since=dt.datetime.now(dt.UTC), timeout=60)
    recovered = time.monotonic() - t_cont
    for p in (f.srv, f.a, f.b):
        problems = log_problems(p.log_path.read_text())
        assert not problems, problems
    if not ok:
        pytest.xfail("known gap: certificates expired while frozen cannot be renewed (see the outage test)")
    print(f"sigstop {FREEZE:.0f}s: recovered {recovered:.2f}s after SIGCONT")
    assert recovered <= 60
