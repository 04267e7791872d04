"""The demo's story, step by step, with cleanup that runs whatever happens.

Topology (both modes)::

    dc1: client ──(run 1: plaintext HTTP)───────────── TAP ──────────────> dc2: service (canary)
    dc1: client -> agent dc1 ==(run 2: mTLS 1.3, X25519MLKEM768)== TAP ==> agent dc2 -> service
         control plane (CA, registry) in dc1

* loopback (default, unprivileged): every process on 127.0.0.1; the TAP is a
  :class:`~tapproof.demo.tap.TapRelay` in this process. Agent dc2 advertises the
  tap's address, so the registry sends agent dc1 through the tap.
* ``--netns`` (root): dc1 and dc2 are network namespaces joined by a veth
  pair (10.77.0.1 and 10.77.0.2); the TAP is ``tcpdump`` on dc1's end of it.

Everything started is recorded (processes by PID in their :class:`Site`, the
namespaces in the :class:`~tapproof.testing.netns.Lab`, the temporary data
directory) and removed in ``finally`` blocks, so Ctrl-C or a failing step
leaves nothing behind. Logs and captures go to the ``--out`` directory.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tapproof.demo.canary import CANARY_ENV
from tapproof.demo.inspect import PQ_GROUP, CaptureView, inspect_capture
from tapproof.demo.sites import LocalSite, NetnsSite, Site, python_argv, tapproof_argv
from tapproof.demo.tap import TapRelay
from tapproof.errors import TapproofError
from tapproof.testing.netns import Capture, Lab
from tapproof.units import parse_hostport

__all__ = ["Demo", "DemoError", "DemoOptions", "DemoResult", "Reporter", "RunResult"]

TRUST_DOMAIN = "demo.tapproof.test"
SERVICE = "customers"
_STEP_TIMEOUT = 20.0  # any single wait (server up, agent up, route usable)


class DemoError(TapproofError):
    """A demo step failed (the message names the step; logs are in the out directory)."""


class Reporter(Protocol):
    """Receives progress (the CLI renders it)."""

    def start(self, title: str) -> None:
        """A step begins."""

    def done(self, title: str, seconds: float) -> None:
        """The step succeeded."""

    def failed(self, title: str, seconds: float) -> None:
        """The step raised (the error follows in the result)."""


class _Quiet:
    def start(self, title: str) -> None:
        pass

    def done(self, title: str, seconds: float) -> None:
        pass

    def failed(self, title: str, seconds: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """Settings of one demo run."""

    out: Path = Path("demo-out")
    netns: bool = False
    keep: bool = False  # keep the temporary data directories (keys!) for debugging


@dataclass(slots=True)
class RunResult:
    """One pass of the canary across the tap."""

    title: str
    path: str  # the route the bytes took, for the table
    client_got_canary: bool
    capture: CaptureView
    agent_groups: list[str] = field(default_factory=list)  # negotiated groups the agents logged


@dataclass(slots=True)
class DemoResult:
    """Everything the CLI shows."""

    mode: str
    canary: str
    out: Path
    runs: list[RunResult]
    seconds: float
    failures: list[str]

    @property
    def ok(self) -> bool:
        """Run 1 saw the canary, run 2 did not, and run 2 was post-quantum."""
        return not self.failures


def _wait(what: str, check: Callable[[], Any], procs: list[subprocess.Popen[bytes]], log: Path | None) -> Any:
    """Poll ``check`` until it returns something truthy (bounded); fail early if a process died."""
    deadline = time.monotonic() + _STEP_TIMEOUT
    while True:
        value = check()
        if value:
            return value
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited with {dead[0].returncode}" if dead else f"not ready after {_STEP_TIMEOUT:.0f}s"
            raise DemoError(f"{what}: {why}{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path | None, lines: int = 6) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    return ("\n  " + "\n  ".join(text)) if text else ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def agent_groups(log: Path) -> list[str]:
    """Negotiated key-exchange groups found in an agent's JSON-lines log (any ``group`` field)."""
    found: set[str] = set()
    if not log.exists():
        return []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("group"), str):
                found.add(rec["group"])
    return sorted(found)


class Demo:
    """Set up, run both passes, inspect the captures, tear down."""

    def __init__(self, options: DemoOptions, reporter: Reporter | None = None) -> None:
        """Nothing starts until :meth:`run`."""
        self.opt = options
        self.rep: Reporter = reporter or _Quiet()
        self.canary = f"CANARY-{secrets.token_hex(8)}"
        self.out = options.out
        self.logs = self.out / "logs"
        self.tmp = Path()
        self.sites: list[Site] = []
        self.lab: Lab | None = None
        self.taps: list[TapRelay] = []
        self.captures: list[Capture] = []
        self.runs: list[RunResult] = []

    @contextlib.contextmanager
    def _step(self, title: str) -> Iterator[None]:
        self.rep.start(title)
        t0 = time.monotonic()
        try:
            yield
        except BaseException:
            self.rep.failed(title, time.monotonic() - t0)
            raise
        self.rep.done(title, time.monotonic() - t0)

    # --- lifecycle -------------------------------------------------------------------
    def run(self) -> DemoResult:
        """Run the whole demo; cleanup always happens (also on Ctrl-C)."""
        t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        for old in self.out.glob("run*.pcap"):
            old.unlink()
        self.tmp = Path(tempfile.mkdtemp(prefix="tapproof-demo-"))
        error = None
        try:
            if self.opt.netns:
                self._netns()
            else:
                self._loopback()
        except (TapproofError, OSError, subprocess.TimeoutExpired) as exc:  # shown with the partial table
            error = str(exc)
        finally:
            with self._step("cleaning up (processes, taps, namespaces, temporary keys)"):
                self.cleanup()
        failures = ([error] if error else []) + self._judge(self.runs)
        mode = "network namespaces + tcpdump" if self.opt.netns else "loopback + userspace tap"
        return DemoResult(mode, self.canary, self.out, self.runs, time.monotonic() - t0, failures)

    def cleanup(self) -> None:
        """Stop every process and tap this demo started, delete namespaces and temporary data (idempotent)."""
        for cap in self.captures:
            with contextlib.suppress(Exception):
                cap.stop(settle=0)
        for tap in self.taps:
            with contextlib.suppress(Exception):
                tap.close()
        for site in reversed(self.sites):
            site.stop_all()
        if self.lab is not None:
            self.lab.close()
        if not self.opt.keep and self.tmp != Path():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _judge(self, runs: list[RunResult]) -> list[str]:
        failures = []
        if len(runs) != 2:
            return [f"the demo completed {len(runs)} of 2 runs"]
        before, after = runs
        if not before.capture.canary_seen:
            failures.append("run 1: the tap did not see the canary, so it proves nothing")
        if not before.client_got_canary or not after.client_got_canary:
            failures.append("the client did not get the service's answer")
        if after.capture.canary_seen:
            failures.append("run 2: the canary crossed the tap in clear")
        if not after.capture.pq:
            failures.append(f"run 2: not every flow negotiated TLS 1.3 with {PQ_GROUP}")
        return failures

    # --- building blocks -----------------------------------------------------------------
    def _site(self, site: Site) -> Site:
        self.sites.append(site)
        return site

    def _tapproof(self, site: Site, *args: str) -> str:
        res = site.run(tapproof_argv(*args), timeout=_STEP_TIMEOUT)
        if res.returncode != 0:
            raise DemoError(f"tapproof {' '.join(args[:3])} failed: {(res.stderr or res.stdout).strip()[-500:]}")
        return res.stdout.strip()

    def _start_server(self, site: Site, listen: str) -> None:
        data = self.tmp / "server"
        self._tapproof(
            site, "server", "init", "--data-dir", str(data), "--trust-domain", TRUST_DOMAIN, "--listen", listen
        )
        log = self.logs / "server.log"
        proc = site.popen(
            tapproof_argv("--log-level", "info", "server", "run", "--data-dir", str(data), "--metrics", ""), log=log
        )
        _wait("control plane", lambda: _read_json(data / "run" / "address.json"), [proc], log)

    def _token(self, site: Site, host: str) -> str:
        return self._tapproof(site, "server", "token", "create", "--data-dir", str(self.tmp / "server"), "--host", host)

    def _start_service(self, site: Site, listen: str) -> str:
        ready = self.tmp / "service.addr"
        log = self.logs / "service.log"
        proc = site.popen(
            python_argv("tapproof.demo.canary", "serve", "--listen", listen, "--ready", str(ready)),
            log=log,
            env={CANARY_ENV: self.canary},
        )
        return str(_wait("canary service", lambda: ready.exists() and ready.read_text(), [proc], log))

    def _start_agent(self, site: Site, name: str, join: str, *args: str, want_routes: bool = False) -> dict[str, Any]:
        data = self.tmp / f"agent-{name}"
        log = self.logs / f"agent-{name}.log"
        argv = tapproof_argv("--log-level", "info", "agent", "run", "--data-dir", str(data), "--join", join, *args)
        proc = site.popen(argv, log=log)
        run_file = data / "run" / "address.json"

        def ready() -> dict[str, Any] | None:
            info = _read_json(run_file)
            if info is None or not info.get("tunnel") or (want_routes and not info.get("routes")):
                return None
            return info

        return dict(_wait(f"agent {name}", ready, [proc], log))

    def _fetch(self, site: Site, target: str, name: str, *, retry: bool) -> bool:
        """The client asks the service once (``retry``: until it answers, bounded); True if it got the canary."""
        out = self.tmp / f"{name}.body"
        deadline = time.monotonic() + (_STEP_TIMEOUT if retry else 0)
        while True:
            site.run(python_argv("tapproof.demo.canary", "fetch", "--connect", target, "--out", str(out)), timeout=15)
            body = out.read_text(errors="replace") if out.exists() else ""
            (self.logs / f"client-{name}.txt").write_text(body)
            if self.canary in body:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.3)

    # --- the two topologies ---------------------------------------------------------------------
    def _inspect(self, pcap: Path) -> CaptureView:
        view = inspect_capture(pcap, self.canary)
        pcap.with_suffix(".audit.json").write_text(json.dumps(view.report, indent=2))
        return view

    def _loopback(self) -> None:
        dc1 = self._site(LocalSite("dc1"))
        dc2 = self._site(LocalSite("dc2"))
        with self._step("control plane: CA, registry (127.0.0.1)"):
            self._start_server(dc1, "127.0.0.1:0")
            joins = {h: self._token(dc1, h) for h in ("dc1", "dc2")}
        with self._step("dc2: service holding the canary"):
            service = self._start_service(dc2, "127.0.0.1:0")
        svc_addr = parse_hostport(service)

        pcap1 = self.out / "run1-plaintext.pcap"
        with self._step("run 1: client -> tap -> service, no tapproof"):
            tap1 = TapRelay(pcap1, svc_addr)
            self.taps.append(tap1)
            tap1.start()
            got1 = self._fetch(dc1, "{}:{}".format(*tap1.address), "run1", retry=False)
            tap1.close()
            view1 = self._inspect(pcap1)
        self.runs.append(RunResult("without tapproof", "client -> TAP -> service", got1, view1))

        pcap2 = self.out / "run2-tapproof.pcap"
        with self._step("dc2: agent fronting the service, advertised through the tap"):
            tap2 = TapRelay(pcap2)
            self.taps.append(tap2)
            tap2.start()
            tap_addr = "{}:{}".format(*tap2.address)
            info2 = self._start_agent(
                dc2,
                "dc2",
                joins["dc2"],
                "--listen-tunnel",
                "127.0.0.1:0",
                "--advertise",
                tap_addr,
                "--service",
                f"{SERVICE}={service}",
                "--admin",
                "127.0.0.1:0",
            )
            tap2.upstream = parse_hostport(str(info2["tunnel"]))
        with self._step("dc1: agent with a route to the service"):
            info1 = self._start_agent(
                dc1,
                "dc1",
                joins["dc1"],
                "--listen-tunnel",
                "127.0.0.1:0",
                "--route",
                f"127.0.0.1:0={SERVICE}@dc2",
                "--admin",
                "127.0.0.1:0",
                want_routes=True,
            )
            route = str(next(iter(dict(info1["routes"]).values())))
        with self._step("run 2: client -> agent dc1 -> tap -> agent dc2 -> service"):
            got2 = self._fetch(dc1, route, "run2", retry=True)
            tap2.close()
            view2 = self._inspect(pcap2)
        groups = sorted({*agent_groups(self.logs / "agent-dc1.log"), *agent_groups(self.logs / "agent-dc2.log")})
        self.runs.append(RunResult("with tapproof", "client -> agent -> TAP -> agent -> service", got2, view2, groups))

    def _netns(self) -> None:
        with self._step("network namespaces dc1 (10.77.0.1) and dc2 (10.77.0.2), veth between"):
            self.lab = Lab(2).__enter__()
            h1, h2 = self.lab.hosts
            dc1 = self._site(NetnsSite("dc1", h1))
            dc2 = self._site(NetnsSite("dc2", h2))
        with self._step("control plane in dc1 (10.77.0.1:7443)"):
            self._start_server(dc1, f"{h1.address}:7443")
            joins = {h: self._token(dc1, h) for h in ("dc1", "dc2")}
        with self._step("dc2: service holding the canary (port 8080)"):
            self._start_service(dc2, "0.0.0.0:8080")

        pcap1 = self.out / "run1-plaintext.pcap"
        with self._step("run 1: tcpdump on the veth; client in dc1 -> service in dc2"):
            cap = h1.capture(pcap1)
            self.captures.append(cap)
            got1 = self._fetch(dc1, f"{h2.address}:8080", "run1", retry=False)
            cap.stop()
            view1 = self._inspect(pcap1)
        self.runs.append(RunResult("without tapproof", "dc1 client -> veth (tcpdump) -> dc2 service", got1, view1))

        pcap2 = self.out / "run2-tapproof.pcap"
        with self._step("agents in dc1 and dc2 (enrollment is captured too)"):
            cap = h1.capture(pcap2)
            self.captures.append(cap)
            tunnel = f"{h2.address}:7444"
            self._start_agent(
                dc2,
                "dc2",
                joins["dc2"],
                "--listen-tunnel",
                tunnel,
                "--advertise",
                tunnel,
                "--service",
                f"{SERVICE}=127.0.0.1:8080",
                "--admin",
                "127.0.0.1:7445",
            )
            info1 = self._start_agent(
                dc1,
                "dc1",
                joins["dc1"],
                "--listen-tunnel",
                f"{h1.address}:7444",
                "--route",
                f"127.0.0.1:6380={SERVICE}@dc2",
                "--admin",
                "127.0.0.1:7445",
                want_routes=True,
            )
            route = str(next(iter(dict(info1["routes"]).values())))
        with self._step("run 2: client in dc1 -> agent dc1 ==veth (tcpdump)==> agent dc2 -> service"):
            got2 = self._fetch(dc1, route, "run2", retry=True)
            cap.stop()
            view2 = self._inspect(pcap2)
        groups = sorted({*agent_groups(self.logs / "agent-dc1.log"), *agent_groups(self.logs / "agent-dc2.log")})
        path = "dc1 client -> agent ==veth (tcpdump)==> agent -> service"
        self.runs.append(RunResult("with tapproof", path, got2, view2, groups))
