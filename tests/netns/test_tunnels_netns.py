"""Three hosts in namespaces: control plane, a client host, a service host; tcpdump on the veths.

The control run (no tunnel) must show the canary, otherwise the tap proves nothing; through the agents
the canary never appears, and every TLS ServerHello carries group 0x11EC (X25519MLKEM768).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tapproof.demo.inspect import inspect_capture, streams
from tapproof.testing.netns import Lab, remove_stale
from tests.helpers import require_root, require_tool
from tests.netns.fleet import PQ_CODE, Fleet, server_hello_groups, unanswered_client_hellos

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """hosts: 10.77.0.1 control plane, 10.77.0.2 client host 'web', 10.77.0.3 service host 'db' (bridge)."""
    require_root()
    require_tool("ip", "tcpdump", "tshark")
    remove_stale()
    with Lab(3) as lab:
        f = Fleet(lab, tmp_path_factory.mktemp("fleet"))
        try:
            f.start_server()
            f.start_service(lab.hosts[2])
            yield f
        finally:
            f.stop()


def _canary_in(pcap: Path, canary: str) -> bool:
    return canary.encode() in pcap.read_bytes() or any(canary.encode() in s for s in streams(pcap).values())


def test_control_run_without_tunnels_shows_the_canary(fleet: Fleet, tmp_path: Path) -> None:
    _cp, web, db = fleet.lab.hosts
    cap_web = web.capture(tmp_path / "web.pcap")
    cap_db = db.capture(tmp_path / "db.pcap")
    body = fleet.fetch(web, f"{db.address}:8080", tries=1)
    assert fleet.canary in body
    for cap in (cap_web, cap_db):
        pcap = cap.stop()
        assert _canary_in(pcap, fleet.canary), f"the tap on {pcap.name} is blind: the test would prove nothing"
        assert inspect_capture(pcap, fleet.canary).grade == "F"


def test_through_the_agents_the_taps_read_nothing_and_every_handshake_is_pq(fleet: Fleet, tmp_path: Path) -> None:
    _cp, web, db = fleet.lab.hosts
    # Capture from before enrollment: control-plane traffic must be PQ TLS too.
    caps = [web.capture(tmp_path / "web.pcap"), db.capture(tmp_path / "db.pcap")]
    fleet.start_agent(db, "db", "--service", "customers=127.0.0.1:8080")
    info = fleet.start_agent(web, "web", "--route", "127.0.0.1:6380=customers@db", want_routes=True)
    route = str(next(iter(info["routes"].values())))
    for _ in range(3):  # several tunnels, each its own handshake
        assert fleet.canary in fleet.fetch(web, route)
    for cap in caps:
        pcap = cap.stop()
        assert not _canary_in(pcap, fleet.canary), f"canary in clear on {pcap.name}"
        groups = server_hello_groups(pcap)
        assert groups, f"no TLS handshake on {pcap.name}"
        assert set(groups) == {PQ_CODE}
        hellos, unanswered = unanswered_client_hellos(pcap)
        assert not unanswered, f"TLS flows without a ServerHello: tcp.stream {unanswered}"
        assert len(groups) >= hellos - 2  # at most the handshakes the capture's end cut (one per agent)
        view = inspect_capture(pcap, fleet.canary)
        assert view.pq
        assert view.grade == "A"
        assert view.protocols == ["tls"]
