"""Transparent mode, inbound: plaintext from the network to a protected port, strict vs permissive.

Two namespaces: 10.77.0.1 runs the control plane and the plaintext client (later an agent too);
10.77.0.2 runs the canary service on port 8080 and an agent with ``--transparent --service
customers=127.0.0.1:8080``, so port 8080 is protected there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tapproof.testing.netns import Host, Lab, remove_stale, stop_process
from tests.helpers import require_root, require_tool
from tests.netns.fleet import Fleet, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 8080
ADMIN = "127.0.0.1:7445"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """hosts[0] = 10.77.0.1 control plane + client, hosts[1] = 10.77.0.2 canary service on :8080."""
    require_root()
    require_tool("ip", "iptables")
    remove_stale()
    with Lab(2) as lab:
        f = Fleet(lab, tmp_path)
        try:
            f.start_server()
            f.start_service(lab.hosts[1], PORT)
            yield f
        finally:
            f.stop()


def start_agent(fleet: Fleet, host: Host, name: str, *args: str) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    info = fleet.start_agent(host, name, *args)
    return info, fleet.site(host).procs[-1]


def stop_agent(fleet: Fleet, host: Host, proc: subprocess.Popen[bytes]) -> None:
    assert stop_process(proc) == 0
    fleet.site(host).procs.remove(proc)


def events(fleet: Fleet, name: str, event: str) -> list[dict[str, Any]]:
    """The agent's structured log lines for ``event``."""
    out = []
    for line in (fleet.tmp / f"agent-{name}.log").read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == event:
            out.append(rec)
    return out


def admin_get(host: Host, path: str) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen('http://{ADMIN}{path}', timeout=5).read().decode())"
    return host.run([sys.executable, "-c", code]).stdout


def metric(host: Host, sample: str) -> float:
    """The value of one exposition line (``name{labels}``), 0 when absent."""
    for line in admin_get(host, "/metrics").splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def nat_rules(host: Host) -> str:
    return host.run(["iptables", "-w", "5", "-t", "nat", "-S"]).stdout


STRICT_REFUSALS = 'tapproof_agent_refusals_total{direction="inbound",reason="plaintext-in-strict-mode"}'


def test_strict_refuses_plaintext_to_a_protected_port_but_tunnels_still_work(fleet: Fleet) -> None:
    client, db = fleet.lab.hosts
    target = f"{db.address}:{PORT}"
    before = nat_rules(db)
    info, db_proc = start_agent(fleet, db, "db", "--transparent", "--service", f"customers=127.0.0.1:{PORT}")
    assert info["inbound"] == "0.0.0.0:7448"
    rules = nat_rules(db)
    assert f"--dport {PORT} -j REDIRECT --to-ports 7448" in rules
    assert "--dport 7444" not in rules  # the tunnel port is never redirected

    # A plaintext client (no agent on its host) dialing the service directly: reset, never the answer.
    body = fleet.fetch(client, target, tries=1)
    assert fleet.canary not in body
    assert body.startswith("error:")
    assert any(s in body for s in ("ConnectionResetError", "RemoteDisconnected", "BrokenPipe")), body

    refused = wait_for("refusal log line", lambda: events(fleet, "db", "plaintext-refused"), None, None, timeout=5)
    assert len(refused) == 1
    rec = refused[0]
    assert rec["reason"] == "plaintext-in-strict-mode"
    assert rec["source"].startswith(f"{client.address}:")
    assert rec["original_dst"] == target
    assert metric(db, STRICT_REFUSALS) == 1.0
    status = json.loads(admin_get(db, "/status"))
    assert status["mode"] == "strict"
    assert status["protected_ports"] == [PORT]
    assert status["plaintext_inbound"]["refused"] == {"plaintext-in-strict-mode": 1}
    assert status["plaintext_inbound"]["accepted"] == 0

    # The same unmodified client, once its host runs an agent: agent-to-agent tunnel, strict is happy.
    _winfo, web_proc = start_agent(fleet, client, "web", "--transparent")
    assert fleet.canary in fleet.fetch(client, target, tries=20)
    assert metric(db, STRICT_REFUSALS) == 1.0  # it came through the tunnel port, not as plaintext
    closed = [e for e in events(fleet, "db", "tunnel-closed") if e.get("direction") == "inbound"]
    assert closed
    assert closed[-1]["group"] == "X25519MLKEM768"

    stop_agent(fleet, client, web_proc)
    stop_agent(fleet, db, db_proc)
    assert nat_rules(db) == before  # clean exit removes the PREROUTING rules too


def test_permissive_forwards_plaintext_to_the_service_and_counts_it_per_source(fleet: Fleet) -> None:
    client, db = fleet.lab.hosts
    target = f"{db.address}:{PORT}"
    _info, db_proc = start_agent(
        fleet, db, "db", "--transparent", "--mode", "permissive", "--service", f"customers=127.0.0.1:{PORT}"
    )
    assert f"--dport {PORT} -j REDIRECT --to-ports 7448" in nat_rules(db)
    for _ in range(2):
        assert fleet.canary in fleet.fetch(client, target, tries=1)

    sample = f'tapproof_agent_plaintext_inbound_total{{source="{client.address}"}}'
    assert metric(db, sample) == 2.0
    assert metric(db, STRICT_REFUSALS) == 0.0
    accepted = events(fleet, "db", "plaintext-accepted")
    assert len(accepted) == 2
    assert all(a["source"].startswith(f"{client.address}:") and a["original_dst"] == target for a in accepted)
    assert all(a["service"] == "customers" for a in accepted)
    status = json.loads(admin_get(db, "/status"))
    assert status["mode"] == "permissive"
    assert status["protected_ports"] == [PORT]
    assert status["plaintext_inbound"]["by_source"] == {client.address: 2}
    assert status["plaintext_inbound"]["accepted"] == 2
    stop_agent(fleet, db, db_proc)
