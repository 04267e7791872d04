"""Transparent mode: iptables REDIRECT into a local listener, SO_ORIGINAL_DST, exact install/remove/repair."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import pytest

from tapproof.agent.transparent import DEFAULT_MARK, Redirector, TransparentError, original_dst
from tapproof.errors import ConfigError
from tapproof.testing.netns import Host, Lab
from tests.helpers import require_tool
from tests.netns.conftest import listener_result, probe, start_listener

FAR = "10.77.0.2"
TPORT = 15001
INBOUND = 15006


def kwargs(**extra: object) -> str:
    base: dict[str, object] = {"transparent_port": TPORT, "fleet_cidrs": ["10.77.0.0/24"]}
    base.update(extra)
    return json.dumps(base)


def nat_rules(host: Host) -> list[str]:
    """The nat table as ``iptables -S`` lines (IPv4)."""
    return host.run(["iptables", "-w", "5", "-t", "nat", "-S"]).stdout.splitlines()


def install(host: Host, action: str = "install", **extra: object) -> None:
    res = probe(host, "redirect", action, kwargs(**extra))
    assert res.returncode == 0, res.stderr


# --- pure (no root) -----------------------------------------------------------------------


def test_rules_exclude_marked_and_owner_traffic_before_redirect() -> None:
    r = Redirector(
        transparent_port=TPORT,
        fleet_cidrs=["10.0.0.0/8", "fd00::/8"],
        protected_ports=[6379],
        inbound_port=INBOUND,
        agent_uid=998,
    )
    rules = r.rules(4)
    assert rules[0] == ["TAPPROOF-OUTPUT", "-m", "mark", "--mark", hex(DEFAULT_MARK), "-j", "RETURN"]
    assert rules[1][:4] == ["TAPPROOF-OUTPUT", "-m", "owner", "--uid-owner"]
    redirects = [x for x in rules if "REDIRECT" in x]
    assert ["TAPPROOF-OUTPUT", "-p", "tcp", "-d", "10.0.0.0/8", "-j", "REDIRECT", "--to-ports", str(TPORT)] in rules
    assert not any("fd00::/8" in x for x in rules)
    assert [x[4] for x in r.rules(6) if x[0] == "TAPPROOF-OUTPUT" and "REDIRECT" in x] == ["fd00::/8"]
    assert ["TAPPROOF-PREROUTING", "-p", "tcp", "--dport", "6379", "-j", "REDIRECT", "--to-ports", str(INBOUND)] in (
        redirects
    )
    assert r.families() == [4, 6]
    assert not any("DROP" in x or "REJECT" in x for x in rules)  # never a black hole


@pytest.mark.parametrize(
    "bad",
    [
        {"transparent_port": 0, "fleet_cidrs": []},
        {"transparent_port": TPORT, "fleet_cidrs": ["not-a-cidr"]},
        {"transparent_port": TPORT, "fleet_cidrs": [], "protected_ports": [6379]},
        {"transparent_port": TPORT, "fleet_cidrs": [], "protected_ports": [70000], "inbound_port": 1},
        {"transparent_port": TPORT, "fleet_cidrs": [], "mark": 0},
    ],
)
def test_bad_settings_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Redirector(**bad)  # type: ignore[arg-type]


def test_original_dst_of_a_plain_socket_is_an_error() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname(), timeout=5):
            conn, _ = srv.accept()
            # Not redirected: conntrack answers with the real destination, or (no conntrack) refuses.
            with conn, contextlib.suppress(TransparentError):
                assert original_dst(conn) == srv.getsockname()


# --- in namespaces (root) -----------------------------------------------------------------


@pytest.fixture
def iptables_lab(lab: Lab) -> Lab:
    require_tool("iptables")
    return lab


@pytest.mark.netns
def test_outbound_redirect_lands_on_local_listener_with_original_destination(iptables_lab: Lab, tmp_path: Path) -> None:
    near, _far = iptables_lab.hosts
    install(near)
    seen = tmp_path / "seen.json"
    listener = start_listener(near, "0.0.0.0", TPORT, seen)
    out = tmp_path / "client.txt"
    probe(near, "connect", FAR, "8080", str(out))  # an unmodified client
    result = listener_result(listener, seen)
    assert result["original_dst"] == [FAR, 8080]
    assert out.read_text() == f"hello from 0.0.0.0:{TPORT}"


@pytest.mark.netns
def test_marked_agent_socket_is_not_redirected(iptables_lab: Lab, tmp_path: Path) -> None:
    near, far = iptables_lab.hosts
    install(near)
    seen = tmp_path / "seen.json"
    listener = start_listener(far, FAR, 8080, seen)
    out = tmp_path / "client.txt"
    probe(near, "connect", FAR, "8080", str(out), "--mark", hex(DEFAULT_MARK))
    assert out.read_text() == f"hello from {FAR}:8080"
    peer = listener_result(listener, seen)["peer"]
    assert isinstance(peer, list)
    assert peer[0] == "10.77.0.1"


@pytest.mark.netns
def test_inbound_to_protected_port_goes_to_the_inbound_port(iptables_lab: Lab, tmp_path: Path) -> None:
    near, far = iptables_lab.hosts
    install(far, protected_ports=[6379], inbound_port=INBOUND)
    seen = tmp_path / "seen.json"
    listener = start_listener(far, "0.0.0.0", INBOUND, seen)
    out = tmp_path / "client.txt"
    probe(near, "connect", FAR, "6379", str(out))
    assert listener_result(listener, seen)["original_dst"] == [FAR, 6379]
    assert out.read_text() == f"hello from 0.0.0.0:{INBOUND}"


@pytest.mark.netns
def test_without_agent_redirected_connections_are_refused_not_blackholed(iptables_lab: Lab, tmp_path: Path) -> None:
    near, far = iptables_lab.hosts
    install(near, "crash")
    seen = tmp_path / "far.json"
    listener = start_listener(far, FAR, 8080, seen)  # the real destination IS listening
    try:
        out = tmp_path / "client.txt"
        probe(near, "connect", FAR, "8080", str(out))
        # refused by the dead local redirect port: an RST at once (a black hole would end in the
        # probe's 10 s "timed out" instead; no wall-clock bound needed to tell them apart)
        assert "Connection refused" in out.read_text()
        assert not seen.exists()  # and nothing leaked past the rules to the far service in plaintext
    finally:
        listener.kill()
        listener.wait(5)


@pytest.mark.netns
def test_install_and_remove_leave_the_rule_set_exactly_as_before(iptables_lab: Lab) -> None:
    near, _far = iptables_lab.hosts
    near.run(["iptables", "-w", "5", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "RETURN"])
    before = nat_rules(near)
    install(near, protected_ports=[6379], inbound_port=INBOUND)
    once = nat_rules(near)
    assert "-N TAPPROOF-OUTPUT" in once
    assert "-A OUTPUT -p tcp -j TAPPROOF-OUTPUT" in once
    assert "-A PREROUTING -p tcp -j TAPPROOF-PREROUTING" in once
    install(near, protected_ports=[6379], inbound_port=INBOUND)
    assert nat_rules(near) == once  # idempotent: no duplicate jumps or rules
    install(near, "remove")
    assert nat_rules(near) == before


@pytest.mark.netns
def test_repair_removes_what_a_crashed_run_left(iptables_lab: Lab) -> None:
    near, _far = iptables_lab.hosts
    before = nat_rules(near)
    install(near, "crash")
    # A second broken run that added a duplicate jump by hand.
    near.run(["iptables", "-w", "5", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "TAPPROOF-OUTPUT"])
    assert nat_rules(near) != before
    assert probe(near, "redirect", "repair", "{}").returncode == 0  # something was removed
    assert nat_rules(near) == before
    assert probe(near, "redirect", "repair", "{}").returncode == 3  # nothing left to remove


def test_transparent_error_is_also_an_oserror() -> None:
    assert issubclass(TransparentError, OSError)
