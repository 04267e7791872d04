"""The setups measured side by side: how each one's two ends are started on loopback.

Every setup carries two services, the echo backend and the iperf3 server, from
a client-side listener ("host A") through an encrypted hop to a server-side
end ("host B"), as two separate processes (or process trees) like on two
hosts. Options are each tool's defaults except what the comparison needs: TLS
1.3 only, ECDSA P-256 certificates, client certificates required and verified
on both ends, host name checked where the tool can, TCP_NODELAY where the tool
has a switch for it, logging at errors only.
"""

from __future__ import annotations

import dataclasses
import resource
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from tests.helpers import free_port

from bench.peers.certs import PeerCerts
from bench.peers.runner import BenchError, Procs, wait_listening

SERVICES = ("echo", "iperf")


@dataclasses.dataclass
class Running:
    """A started setup: where the load connects, and which processes are the tunnel."""

    front: dict[str, int]  # service -> client-side port on 127.0.0.1
    tunnel_pids: list[int]  # roots of the tunnel process trees (both ends)
    agent_pids: list[int] = dataclasses.field(default_factory=list)  # tapproof: the two agents
    tls_ports: list[int] = dataclasses.field(default_factory=list)  # ports of the encrypted hop
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def nofile_limit() -> int:
    """The soft RLIMIT_NOFILE every started process inherits."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Setup:
    """One way of carrying the traffic."""

    name = "?"
    tls = True
    tools: tuple[str, ...] = ()
    idle_rss = True  # RSS with idle tunnels is meaningful

    def __init__(self, work: Path, certs: PeerCerts) -> None:
        self.work = work / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.procs = Procs()

    def missing(self) -> list[str]:
        """Executables this setup needs that are not on PATH."""
        return [t for t in self.tools if shutil.which(t) is None]

    def start(self, backends: dict[str, int]) -> Running:
        """Start both ends in front of ``backends`` (service -> port)."""
        raise NotImplementedError

    def groups_from_logs(self) -> list[str]:
        """Negotiated TLS groups the tunnel's own logs report (empty if it does not log them)."""
        return []

    def stop(self) -> None:
        """Stop every process of this setup by PID."""
        self.procs.stop_all()

    def _ports(self) -> tuple[dict[str, int], dict[str, int]]:
        return {s: free_port(hold=False) for s in SERVICES}, {s: free_port(hold=False) for s in SERVICES}

    def _wait(self, ports: dict[str, int], proc: Any, what: str) -> None:
        for port in ports.values():
            wait_listening(port, proc, what)


class Plaintext(Setup):
    """No tunnel: the load talks to the backends directly (the limit)."""

    name = "plaintext"
    tls = False
    idle_rss = False

    def start(self, backends: dict[str, int]) -> Running:
        """Nothing to start."""
        return Running(front=dict(backends), tunnel_pids=[])


class Tapproof(Setup):
    """``tapproof server`` + a server agent (``--service``) + a client agent (``--route``)."""

    name = "tapproof"
    client_flags: tuple[str, ...] = ()

    def __init__(self, work: Path, certs: PeerCerts) -> None:
        super().__init__(work, certs)
        self.agents: list[Any] = []
        self.server: Any = None

    def start(self, backends: dict[str, int]) -> Running:
        """Enrol two agents with a fresh control plane; routes echo@b and iperf@b."""
        from tests.integration import procs as tp  # the test-suite process helpers (real CLI)

        srv = tp.start_server(self.work / "srv")
        self.server = srv
        self.procs.add(srv.proc)
        common = ("--drain-timeout", "2s")
        services = [x for s in SERVICES for x in ("--service", f"{s}=127.0.0.1:{backends[s]}")]
        b = tp.start_agent(self.work / "b", srv.token("b"), *services, *common)
        self.procs.add(b.proc)
        routes = [x for s in SERVICES for x in ("--route", f"127.0.0.1:0={s}@b")]
        a = tp.start_agent(self.work / "a", srv.token("a"), *routes, *common, *self.client_flags)
        self.procs.add(a.proc)
        self.agents = [a, b]
        tp.wait_for(lambda: "b" in a.status()["registry_hosts"], 30, "agent a to learn b's address")
        front = {s: a.route(i)[1] for i, s in enumerate(SERVICES)}
        pids = [a.proc.pid, b.proc.pid]
        return Running(front=front, tunnel_pids=pids, agent_pids=pids, tls_ports=[b.tunnel[1]])

    def groups_from_logs(self) -> list[str]:
        """The ``group`` of every logged tunnel event on both agents."""
        found: set[str] = set()
        for agent in self.agents:
            for ev in agent.events():
                if ev.get("group"):
                    found.add(str(ev["group"]))
        return sorted(found)


class TapproofMux(Tapproof):
    """The same, the client agent with ``--mux``: streams over pooled agent-pair connections."""

    name = "tapproof-mux"
    client_flags = ("--mux",)


class Stunnel(Setup):
    """stunnel4 at both ends: client mode with a client certificate, server requiring one."""

    name = "stunnel"
    tools = ("stunnel4",)

    def _conf(self, path: Path, sections: list[str]) -> Path:
        head = [
            "foreground = yes",
            "pid =",
            "debug = 3",
            f"output = {path.with_suffix('.log')}",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
        ]
        path.write_text("\n".join(head + sections) + "\n")
        return path

    def start(self, backends: dict[str, int]) -> Running:
        """Two stunnel4 processes, each with an echo and an iperf section."""
        c = self.certs
        front, mid = self._ports()
        tls13 = ["sslVersionMin = TLSv1.3", f"CAfile = {c.ca}", "verifyChain = yes"]
        srv = [
            x
            for s in SERVICES
            for x in (
                f"[{s}]",
                f"accept = 127.0.0.1:{mid[s]}",
                f"connect = 127.0.0.1:{backends[s]}",
                f"cert = {c.server_crt}",
                f"key = {c.server_key}",
                "requireCert = yes",
                *tls13,
            )
        ]
        cli = [
            x
            for s in SERVICES
            for x in (
                f"[{s}]",
                "client = yes",
                f"accept = 127.0.0.1:{front[s]}",
                f"connect = 127.0.0.1:{mid[s]}",
                f"cert = {c.client_crt}",
                f"key = {c.client_key}",
                "checkHost = localhost",
                *tls13,
            )
        ]
        ps = self.procs.spawn(["stunnel4", str(self._conf(self.work / "server.conf", srv))], self.work / "server.out")
        self._wait(mid, ps, "stunnel (server end)")
        pc = self.procs.spawn(["stunnel4", str(self._conf(self.work / "client.conf", cli))], self.work / "client.out")
        self._wait(front, pc, "stunnel (client end)")
        return Running(front=front, tunnel_pids=[pc.pid, ps.pid], tls_ports=list(mid.values()))


class Spiped(Setup):
    """spiped -e / -d pairs with a shared 256-bit key (not TLS: its own protocol)."""

    name = "spiped"
    tls = False
    tools = ("spiped",)

    def start(self, backends: dict[str, int]) -> Running:
        """One encrypting and one decrypting spiped per service."""
        key = self.work / "key"
        key.write_bytes(secrets.token_bytes(32))
        key.chmod(0o600)
        front, mid = self._ports()
        pids = []
        for s in SERVICES:
            common = ["-k", str(key), "-F", "-n", "0", "-o", "10"]
            d = ["spiped", "-d", "-s", f"[127.0.0.1]:{mid[s]}", "-t", f"[127.0.0.1]:{backends[s]}", *common]
            pd = self.procs.spawn(d, self.work / f"{s}-d.out")
            wait_listening(mid[s], pd, "spiped -d")
            e = ["spiped", "-e", "-s", f"[127.0.0.1]:{front[s]}", "-t", f"[127.0.0.1]:{mid[s]}", *common]
            pe = self.procs.spawn(e, self.work / f"{s}-e.out")
            wait_listening(front[s], pe, "spiped -e")
            pids += [pe.pid, pd.pid]
        return Running(front=front, tunnel_pids=pids, tls_ports=list(mid.values()))


class Socat(Setup):
    """socat with OPENSSL on both ends (one forked process per connection), verify on."""

    name = "socat"
    tools = ("socat",)
    idle_rss = False  # one process per connection: summed RSS counts shared pages thousands of times

    def start(self, backends: dict[str, int]) -> Running:
        """A TCP-LISTEN -> OPENSSL and an OPENSSL-LISTEN -> TCP socat per service."""
        c = self.certs
        front, mid = self._ports()
        pids = []
        tls = "min-version=TLS1.3"
        for s in SERVICES:
            srv = [
                "socat",
                f"OPENSSL-LISTEN:{mid[s]},bind=127.0.0.1,reuseaddr,fork,backlog=1024,nodelay,"
                f"cert={c.server_pem},cafile={c.ca},verify=1,{tls}",
                f"TCP:127.0.0.1:{backends[s]},nodelay",
            ]
            ps = self.procs.spawn(srv, self.work / f"{s}-server.out")
            wait_listening(mid[s], ps, "socat (server end)")
            cli = [
                "socat",
                f"TCP-LISTEN:{front[s]},bind=127.0.0.1,reuseaddr,fork,backlog=1024,nodelay",
                f"OPENSSL:localhost:{mid[s]},pf=ip4,nodelay,cert={c.client_pem},cafile={c.ca},verify=1,{tls}",
            ]
            pc = self.procs.spawn(cli, self.work / f"{s}-client.out")
            wait_listening(front[s], pc, "socat (client end)")
            pids += [pc.pid, ps.pid]
        return Running(front=front, tunnel_pids=pids, tls_ports=list(mid.values()))


class Haproxy(Setup):
    """haproxy at both ends: plain frontend -> TLS backend with a client certificate -> TLS frontend -> backend."""

    name = "haproxy"
    tools = ("haproxy",)

    def _conf(self, path: Path, body: list[str]) -> Path:
        head = [
            "global",
            f"  maxconn {max(1000, (nofile_limit() - 200) // 2)}",  # 2 fds per tunnel within RLIMIT_NOFILE
            "  ssl-server-verify required",
            "defaults",
            "  mode tcp",
            "  timeout connect 10s",
            "  timeout client 30m",
            "  timeout server 30m",
        ]
        path.write_text("\n".join(head + body) + "\n")
        return path

    def start(self, backends: dict[str, int]) -> Running:
        """Two haproxy processes (``-db``: foreground, its default threads)."""
        c = self.certs
        front, mid = self._ports()
        srv: list[str] = []
        cli: list[str] = []
        for s in SERVICES:
            srv += [
                f"frontend f_{s}",
                f"  bind 127.0.0.1:{mid[s]} ssl crt {c.server_pem} ca-file {c.ca} verify required ssl-min-ver TLSv1.3",
                f"  default_backend b_{s}",
                f"backend b_{s}",
                f"  server s1 127.0.0.1:{backends[s]}",
            ]
            cli += [
                f"frontend f_{s}",
                f"  bind 127.0.0.1:{front[s]}",
                f"  default_backend b_{s}",
                f"backend b_{s}",
                f"  server s1 127.0.0.1:{mid[s]} ssl crt {c.client_pem} ca-file {c.ca} verify required "
                "verifyhost localhost ssl-min-ver TLSv1.3",
            ]
        ps = self.procs.spawn(
            ["haproxy", "-db", "-f", str(self._conf(self.work / "server.cfg", srv))], self.work / "server.out"
        )
        self._wait(mid, ps, "haproxy (server end)")
        pc = self.procs.spawn(
            ["haproxy", "-db", "-f", str(self._conf(self.work / "client.cfg", cli))], self.work / "client.out"
        )
        self._wait(front, pc, "haproxy (client end)")
        return Running(front=front, tunnel_pids=[pc.pid, ps.pid], tls_ports=list(mid.values()))


ALL: dict[str, type[Setup]] = {
    cls.name: cls for cls in (Plaintext, Tapproof, TapproofMux, Stunnel, Spiped, Socat, Haproxy)
}


def check_python() -> None:
    """The harness needs Linux /proc and epoll."""
    if not sys.platform.startswith("linux"):
        raise BenchError("the peers benchmark needs Linux (/proc, epoll)")
