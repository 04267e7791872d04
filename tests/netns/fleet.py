"""A small fleet in network namespaces: control plane, agents, the canary service, captures, tshark.

Built on :class:`tapproof.testing.netns.Lab` and the demo's :class:`~tapproof.demo.sites.NetnsSite`
(processes stopped by PID); the lab deletes its namespaces even when a test fails.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from tapproof.demo.canary import CANARY_ENV
from tapproof.demo.sites import NetnsSite, python_argv, tapproof_argv
from tapproof.testing.netns import Host, Lab

TD = "netns.tapproof.test"
PQ_CODE = 0x11EC
TLS_PORTS = (7443, 7444)


def wait_for(what: str, check: Any, proc: subprocess.Popen[bytes] | None, log: Path | None, timeout: float = 20) -> Any:
    """Poll ``check()`` until truthy (bounded); fail early with the log tail if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise AssertionError(f"{what} not ready\n{tail}")
        time.sleep(0.05)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None while it is missing or half-written."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Fleet:
    """Control plane on hosts[0]; the canary service on the last host; agents where a test wants them."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.canary = f"CANARY-{secrets.token_hex(8)}"
        self.sites = {h.name: NetnsSite(h.name, h) for h in lab.hosts}
        self.server_dir = tmp / "server"

    def site(self, host: Host) -> NetnsSite:
        """The site (process tracker) of ``host``."""
        return self.sites[host.name]

    def tapproof(self, host: Host, *args: str) -> str:
        """Run a one-shot tapproof command in ``host``; return stdout."""
        res = self.site(host).run(tapproof_argv(*args), timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def start_server(self) -> None:
        """``server init`` + ``server run`` on hosts[0]:7443."""
        h = self.lab.hosts[0]
        d = str(self.server_dir)
        self.tapproof(h, "server", "init", "--data-dir", d, "--trust-domain", TD, "--listen", f"{h.address}:7443")
        log = self.tmp / "server.log"
        proc = self.site(h).popen(tapproof_argv("--log-level", "info", "server", "run", "--data-dir", d), log=log)
        wait_for("server", lambda: read_json(self.server_dir / "run" / "address.json"), proc, log)

    def token(self, name: str) -> str:
        """A join string for host ``name``."""
        args = ("server", "token", "create", "--data-dir", str(self.server_dir), "--host", name)
        return self.tapproof(self.lab.hosts[0], *args)

    def start_service(self, host: Host, port: int = 8080) -> None:
        """The canary HTTP service on ``0.0.0.0:port`` in ``host``."""
        ready = self.tmp / f"service-{host.index}.addr"
        log = self.tmp / f"service-{host.index}.log"
        argv = python_argv("tapproof.demo.canary", "serve", "--listen", f"0.0.0.0:{port}", "--ready", str(ready))
        proc = self.site(host).popen(argv, log=log, env={CANARY_ENV: self.canary})
        wait_for("service", ready.exists, proc, log)

    def start_agent(
        self, host: Host, name: str, *args: str, want_routes: bool = False, timeout: float = 20
    ) -> dict[str, Any]:
        """``agent run`` in ``host`` (tunnel on HOST_ADDR:7444, advertised); return its run file."""
        data = self.tmp / f"agent-{name}"
        log = self.tmp / f"agent-{name}.log"
        tunnel = f"{host.address}:7444"
        argv = tapproof_argv(
            "--log-level", "info", "agent", "run", "--data-dir", str(data), "--join", self.token(name),
            "--listen-tunnel", tunnel, "--advertise", tunnel, "--admin", "127.0.0.1:7445", *args,
        )  # fmt: skip
        proc = self.site(host).popen(argv, log=log)

        def ready() -> dict[str, Any] | None:
            info = read_json(data / "run" / "address.json")
            return info if info and (info.get("routes") or not want_routes) else None

        return dict(wait_for(f"agent {name}", ready, proc, log, timeout))

    def fetch(self, host: Host, target: str, *, tries: int = 60) -> str:
        """The client in ``host`` GETs the service at ``target``; retried (bounded) until the canary comes back."""
        out = self.tmp / "fetch.body"
        body = ""
        for _ in range(tries):
            self.site(host).run(python_argv("tapproof.demo.canary", "fetch", "--connect", target, "--out", str(out)))
            body = out.read_text(errors="replace") if out.exists() else ""
            if self.canary in body:
                return body
            time.sleep(0.3)
        return body

    def stop(self) -> None:
        """Stop every process this fleet started (the lab deletes the namespaces)."""
        for site in self.sites.values():
            site.stop_all()


def server_hello_groups(pcap: Path) -> list[int]:
    """The key_share group of every TLS ServerHello in ``pcap`` (tshark, tapproof's ports decoded as TLS)."""
    decode = [arg for p in TLS_PORTS for arg in ("-d", f"tcp.port=={p},tls")]
    res = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), *decode, "-Y", "tls.handshake.type==2",
         "-T", "fields", "-e", "tls.handshake.extensions_key_share_group"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [int(v, 0) for line in res.stdout.split() for v in line.split(",") if v]


def unanswered_client_hellos(pcap: Path, grace: float = 3.0) -> tuple[int, list[int]]:
    """(ClientHellos in ``pcap``, TCP streams whose ClientHello got no ServerHello).

    A handshake the capture's end cut in two (agents poll the control plane all the time) is not
    a flow without a ServerHello: ClientHellos in the last ``grace`` seconds of the capture are
    not counted as unanswered.
    """
    decode = [arg for p in TLS_PORTS for arg in ("-d", f"tcp.port=={p},tls")]
    res = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), *decode, "-Y", "tls.handshake.type==1 || tls.handshake.type==2",
         "-T", "fields", "-E", "separator=;", "-e", "tcp.stream", "-e", "frame.time_epoch", "-e", "tls.handshake.type"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    hello: dict[int, float] = {}
    answered: set[int] = set()
    last = 0.0
    for line in res.stdout.splitlines():
        stream, when, types = line.split(";")
        last = max(last, float(when))
        if "1" in types.split(","):
            hello.setdefault(int(stream), float(when))
        if "2" in types.split(","):
            answered.add(int(stream))
    end = max(last, pcap.stat().st_mtime)
    cut = [st for st, t in hello.items() if st not in answered and t < end - grace]
    return len(hello), sorted(cut)
