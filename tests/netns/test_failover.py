"""Two control-plane servers on one real PostgreSQL, agents in network namespaces; kill -9 either server.

hosts: 10.77.0.1 server A, 10.77.0.2 server B (and agent "ops"), 10.77.0.3 agent "web",
10.77.0.4 agent "db" in front of an echo service. PostgreSQL is the session's private
instance in the root namespace, reached over its Unix socket (a path, so namespaces do not
matter). Host certificates live 1 minute and are renewed every ~6 s, so every phase sees
renewals. A stream through web -> db runs across both kills and must end intact.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tapproof.demo.sites import tapproof_argv
from tapproof.testing.netns import Host, Lab, remove_stale
from tests.helpers import require_root, require_tool
from tests.integration import procs
from tests.integration.test_agent_renewal import Stream
from tests.netns.fleet import TD, Fleet, read_json, wait_for
from tests.pgserver import PgServer

pytestmark = [pytest.mark.netns, pytest.mark.postgres, pytest.mark.slow]

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(host: Host, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that joined ``host``'s network namespace (sockets it makes stay there)."""
    out: dict[str, Any] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{host.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                out["error"] = OSError(ctypes.get_errno(), "setns")
                return
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


def agent_metric(host: Host, name: str, **labels: str) -> float:
    """One sample from the agent's /metrics on 127.0.0.1:7445 in ``host`` (0 when absent)."""

    def fetch() -> str:
        with urllib.request.urlopen("http://127.0.0.1:7445/metrics", timeout=5) as r:
            return str(r.read().decode())

    for family in text_string_to_metric_families(in_netns(host, fetch)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


class Server:
    """One ``tapproof server run`` in a namespace, killable and restartable."""

    def __init__(self, fleet: Fleet, host: Host, data_dir: Path) -> None:
        self.fleet, self.host, self.data_dir = fleet, host, data_dir
        self.log = fleet.tmp / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Run it and wait for its run file."""
        (self.data_dir / "run" / "address.json").unlink(missing_ok=True)
        argv = tapproof_argv("--log-level", "info", "server", "run", "--data-dir", str(self.data_dir))
        self.proc = proc = self.fleet.site(self.host).popen(argv, log=self.log)
        wait_for("server", lambda: read_json(self.data_dir / "run" / "address.json"), proc, self.log)

    def kill(self) -> None:
        """SIGKILL: no goodbye."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def fleet(tmp_path: Path, pg_server: PgServer) -> Iterator[tuple[Fleet, list[Server]]]:
    require_root()
    require_tool("ip")
    remove_stale()
    name = pg_server.create_database().rsplit("/", 1)[1]
    url = f"postgresql://tapproof@/{name}?host={pg_server.root}&port={pg_server.port}"
    with Lab(4) as lab:
        f = Fleet(lab, tmp_path)
        try:
            h0, h1 = lab.hosts[0], lab.hosts[1]
            f.tapproof(h0, "server", "init", "--data-dir", str(f.server_dir), "--trust-domain", TD,
                       "--listen", f"{h0.address}:7443", "--leaf-ttl", "1m", "--db", url)  # fmt: skip
            peer_dir = tmp_path / "server-b"
            procs.init_peer_server(f.server_dir, peer_dir, listen=f"{h1.address}:7443")
            servers = [Server(f, h0, f.server_dir), Server(f, h1, peer_dir)]
            for s in servers:
                s.start()
            yield f, servers
        finally:
            f.stop()
            pg_server.drop_database(pg_server.url_for(name))


def test_kill_either_server_loses_no_tunnel_and_agents_renew_through_the_other(
    fleet: tuple[Fleet, list[Server]],
) -> None:
    f, servers = fleet
    _h0, h1, web, db = f.lab.hosts
    echo = in_netns(db, procs.EchoServer)
    try:
        fast = ("--renew-fraction", "0.1", "--sync-interval", "1s")
        f.start_agent(db, "db", "--service", f"echo=127.0.0.1:{echo.port}", *fast, timeout=60)
        f.start_agent(web, "web", "--route", "127.0.0.1:6380=echo@db", *fast, want_routes=True, timeout=60)
        f.start_agent(h1, "ops", "--route", "127.0.0.1:6380=echo@db", *fast, want_routes=True, timeout=60)
        agents = [web, db, h1]
        for s in ("web", "db", "ops"):  # the join strings listed both servers, and the agents kept them
            kept = (f.tmp / f"agent-{s}" / "agent.toml").read_text()
            assert all(srv.host.address in kept for srv in servers), kept
        pids = [p.pid for site in f.sites.values() for p in site.procs if "agent" in p.args]

        def renewals(h: Host) -> float:
            return agent_metric(h, "tapproof_agent_renewals_total", result="success")

        def renew_twice(why: str) -> None:
            """Every agent completes two more renewals (bounded), with the control plane seen up."""
            start = {h.name: renewals(h) for h in agents}
            for h in agents:
                wait_for(f"{why}: renewals of {h.name}", lambda h=h: renewals(h) >= start[h.name] + 2, None, None, 40)
                wait_for(  # any failed poll drops the gauge until the next one succeeds
                    f"{why}: control plane up at {h.name}",
                    lambda h=h: agent_metric(h, "tapproof_agent_control_plane_up") == 1,
                    None,
                    None,
                    20,
                )

        def tunnel_works(h: Host) -> None:
            sent, received, n = in_netns(h, lambda: procs.echo_roundtrip(("127.0.0.1", 6380), 256 << 10))
            assert (sent, n) == (received, 256 << 10)

        renew_twice("both servers up")
        stream = in_netns(web, lambda: Stream(("127.0.0.1", 6380)))

        for victim, survivor in ((servers[0], servers[1]), (servers[1], servers[0])):
            victim.kill()
            renew_twice(f"{victim.host.address} killed")  # only the survivor can have answered
            for h in (web, h1):
                tunnel_works(h)
            assert survivor.proc is not None
            assert survivor.proc.poll() is None
            victim.start()  # it serves again: the admin CLI on its host goes through it
            assert f.tapproof(victim.host, "server", "status", "--data-dir", str(victim.data_dir))

        stream.finish()
        assert not stream.errors, stream.errors
        assert stream.n_received == stream.n_sent > 1 << 20
        assert stream.received.hexdigest() == stream.sent.hexdigest()
        alive = [p.pid for site in f.sites.values() for p in site.procs if "agent" in p.args and p.poll() is None]
        assert alive == pids  # no agent restarted
    finally:
        echo.close()
