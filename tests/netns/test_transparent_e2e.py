"""Transparent mode end to end: an unmodified client in one namespace reaches a far service by its address;
the agents carry it, and tcpdump on the service host's veth shows only PQ TLS (no canary)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapproof.demo.inspect import inspect_capture, streams
from tapproof.testing.netns import Lab, remove_stale
from tests.helpers import require_root, require_tool
from tests.netns.fleet import PQ_CODE, Fleet, server_hello_groups

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """10.77.0.1 control plane, 10.77.0.2 'web' (transparent agent, client), 10.77.0.3 'db' (service)."""
    require_root()
    require_tool("ip", "iptables", "tcpdump", "tshark")
    remove_stale()
    with Lab(3) as lab:
        f = Fleet(lab, tmp_path)
        try:
            f.start_server()
            f.start_service(lab.hosts[2])
            yield f
        finally:
            f.stop()


def test_unmodified_client_reaches_far_service_through_agents_and_the_wire_shows_only_pq_tls(
    fleet: Fleet, tmp_path: Path
) -> None:
    _cp, web, db = fleet.lab.hosts
    cap = db.capture(tmp_path / "db.pcap")
    fleet.start_agent(db, "db", "--service", "customers=127.0.0.1:8080", "--transparent")
    info = fleet.start_agent(web, "web", "--transparent", "--transparent-port", "7447")
    assert info.get("transparent")
    rules = web.run(["iptables", "-w", "5", "-t", "nat", "-S"]).stdout
    assert "-A OUTPUT -p tcp -j TAPPROOF-OUTPUT" in rules
    assert f"-d {db.address}/32" in rules

    body = fleet.fetch(web, f"{db.address}:8080", tries=20)  # the client knows nothing of tapproof
    assert fleet.canary in body

    pcap = cap.stop()
    assert fleet.canary.encode() not in pcap.read_bytes()
    assert not any(fleet.canary.encode() in s for s in streams(pcap).values())
    groups = server_hello_groups(pcap)
    assert groups
    assert set(groups) == {PQ_CODE}
    view = inspect_capture(pcap, fleet.canary)
    assert view.protocols == ["tls"]
    assert view.grade == "A"
    # Nothing in clear went to the service port across the wire.
    direct = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-Y", "tcp.port==8080"], capture_output=True, text=True, timeout=60
    )
    assert direct.stdout.strip() == ""


def test_clean_agent_exit_removes_the_rules(fleet: Fleet) -> None:
    _cp, web, db = fleet.lab.hosts
    before = web.run(["iptables", "-w", "5", "-t", "nat", "-S"]).stdout
    fleet.start_agent(db, "db", "--service", "customers=127.0.0.1:8080", "--transparent")
    fleet.start_agent(web, "web", "--transparent", "--transparent-port", "7447")
    assert "TAPPROOF-OUTPUT" in web.run(["iptables", "-w", "5", "-t", "nat", "-S"]).stdout
    fleet.site(web).stop_all()  # SIGTERM: drain, remove rules, exit 0
    assert web.run(["iptables", "-w", "5", "-t", "nat", "-S"]).stdout == before


_PROBE = """
import sys, time
from pathlib import Path
from tapproof.agent.state import AgentPaths, load_bundle, load_credentials
from tapproof.agent.transparent import DEFAULT_MARK
from tapproof.tls import context
from tapproof.tls.stream import connect
from tapproof.tunnel.preamble import ClientPreamble
paths = AgentPaths(Path(sys.argv[1]))
ctx = context.client_context(load_credentials(paths), load_bundle(paths))
for target in sys.argv[3:]:
    s = connect((sys.argv[2], 7444), ctx, timeout=10, mark=DEFAULT_MARK)  # bypass web's own redirect
    cp = ClientPreamble(target)
    s.sendall(cp.request(), time.monotonic() + 10)
    resp = None
    while resp is None:
        data = s.recv(4096, time.monotonic() + 10)
        resp = cp.feed(data) if data else None
        if not data:
            break
    print(target, resp.status if resp else "closed")
    s.abort()
"""


def test_address_targets_reach_only_fronted_ports_never_loopback(fleet: Fleet, tmp_path: Path) -> None:
    """An enrolled peer cannot use a transparent agent to reach loopback-only or unfronted ports."""
    import sys

    _cp, web, db = fleet.lab.hosts
    fleet.start_agent(db, "db", "--service", "customers=127.0.0.1:8080", "--transparent")
    fleet.start_agent(web, "web", "--transparent", "--transparent-port", "7447")
    targets = [f"{db.address}:8080", "127.0.0.1:8080", f"{db.address}:22", f"{db.address}:7445"]
    res = web.run([sys.executable, "-c", _PROBE, str(tmp_path / "agent-web"), db.address, *targets])
    assert res.returncode == 0, res.stderr
    status = dict(line.split() for line in res.stdout.splitlines())
    assert status == {targets[0]: "200", targets[1]: "403", targets[2]: "403", targets[3]: "403"}, status
