"""The soak scenario, one function per step.

A real control plane (leaf lifetime 5 minutes) and two real agents on
127.0.0.1: ``a`` routes to ``echo@b``, ``b`` fronts a one-thread echo service.
For ``duration`` seconds:

- ``streams`` long streams through the route, each sending 4 KiB every 100 ms
  and checking that the same bytes come back in order;
- ``rate`` new connections per second (connect, 1 KiB echoed, close);
- renewals: agents renew at a fraction of the 5-minute lifetime chosen so
  that each renews at least once in the run (0.5 when the run allows it);
- at 40% of the run, a CA (root) rotation: :func:`rotate_ca`;
- at 65%, ``kill -9`` of agent ``b`` and a restart on the same tunnel port:
  :func:`kill_and_restart`. The fault window runs from the kill until 10 s
  after the restarted agent answers; failures inside it are counted apart;
- every 2 s, RSS, descriptors and threads of the server and both agents.

Passed when no request failed outside the fault window, every long stream
that was not cut by the fault kept its bytes intact, each agent renewed, the
rotation completed (or is reported as not available) and every process is
alive at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from tests.battery import loadkit
from tests.integration import procs

LEAF_TTL = "5m"
LEAF_SECONDS = 300.0
FAULT_GRACE = 10.0
SAMPLE_EVERY = 2.0
CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to run."""

    duration: float = 600.0
    streams: int = 50
    rate: float = 20.0

    @property
    def renew_fraction(self) -> float:
        """0.5 when a renewal at half-life fits in the first 70% of the run, else smaller."""
        return max(0.1, min(0.5, 0.6 * self.duration / LEAF_SECONDS))


class Ledger:
    """Every request's outcome with its time, and the fault window."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[tuple[float, str, str]] = []  # (time, kind, error)
        self.setup_times: list[float] = []
        self.fault: tuple[float, float] | None = None  # [kill, recovered + grace]
        self.fault_open = False
        self.stream_bytes = 0

    def success(self, setup: float | None = None) -> None:
        with self.lock:
            self.ok += 1
            if setup is not None:
                self.setup_times.append(setup)

    def failure(self, kind: str, error: str) -> None:
        with self.lock:
            self.failures.append((time.monotonic(), kind, error[:160]))

    def in_fault(self, t: float) -> bool:
        if self.fault_open and self.fault is not None and t >= self.fault[0]:
            return True
        return self.fault is not None and self.fault[0] <= t <= self.fault[1]

    def outside(self) -> list[tuple[float, str, str]]:
        with self.lock:
            return [f for f in self.failures if not self.in_fault(f[0])]


# --- load ------------------------------------------------------------------------------------
def long_stream(index: int, route: Callable[[], tuple[str, int]], ledger: Ledger, stop: threading.Event) -> None:
    """One long stream: 4 KiB out, the same 4 KiB back, every 100 ms; reopened after a failure."""
    while not stop.is_set():
        try:
            with socket.create_connection(route(), timeout=10) as s:
                s.settimeout(10)
                n = 0
                while not stop.is_set():
                    chunk = (index.to_bytes(2, "big") + n.to_bytes(6, "big")) * (CHUNK // 8)
                    s.sendall(chunk)
                    got = bytearray()
                    while len(got) < CHUNK:
                        part = s.recv(CHUNK - len(got))
                        if not part:
                            raise ConnectionError(f"stream closed after {n} chunks")
                        got += part
                    if bytes(got) != chunk:
                        raise ConnectionError(f"stream {index}: bytes differ at chunk {n}")
                    ledger.success()
                    with ledger.lock:
                        ledger.stream_bytes += 2 * CHUNK
                    n += 1
                    stop.wait(0.1)
        except OSError as exc:
            if stop.is_set():
                return
            ledger.failure("stream", f"{type(exc).__name__}: {exc}")
            stop.wait(1.0)


def new_connections(route: Callable[[], tuple[str, int]], rate: float, until: float, ledger: Ledger) -> None:
    """``rate`` new connections per second until ``until`` (each in a pool thread)."""
    from concurrent.futures import ThreadPoolExecutor

    payload = os.urandom(1024)

    def one() -> None:
        start = time.monotonic()
        try:
            with socket.create_connection(route(), timeout=10) as s:
                s.settimeout(10)
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    part = s.recv(len(payload) - len(got))
                    if not part:
                        raise ConnectionError(f"closed after {len(got)} bytes")
                    got += part
                if got != payload:
                    raise ConnectionError("echo differs")
        except OSError as exc:
            ledger.failure("new", f"{type(exc).__name__}: {exc}")
            return
        ledger.success(time.monotonic() - start)

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        i = 0
        while True:
            due = start + i / rate
            if due >= until:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            pool.submit(one)
            i += 1


# --- steps -----------------------------------------------------------------------------------
def _bundle_roots(agent: procs.AgentProc) -> int:
    return (agent.data_dir / "bundle.pem").read_text().count("BEGIN CERTIFICATE")


def _leaf_issuer(agent: procs.AgentProc) -> bytes:
    from tapproof.pki import certs

    chain = certs.load_pem_chain((agent.data_dir / "cert.pem").read_bytes())
    return chain[-1].fingerprint(hashes.SHA256())


def rotate_ca(bed: loadkit.Bed, log: Callable[[str], None], deadline: float) -> dict[str, Any]:
    """Root rotation with ``tapproof server ca rotate prepare|activate|retire``, waiting for the agents at each step.

    prepare: the agents' bundles carry both roots; activate: new leaves chain to
    the new root (the agents renew with a new key); retire: the bundles drop the
    old root. Each wait is bounded by ``deadline``. Returns what happened.
    """
    probe = procs.tapproof("server", "ca", "rotate", "--help")
    if probe.returncode != 0:
        log("[yellow]CA rotation skipped: `tapproof server ca rotate` is not available in this build")
        return {"status": "not-available", "detail": "tapproof server ca rotate is missing"}
    agents = [bed.a, bed.b]
    steps: dict[str, Any] = {"status": "done"}

    def step(name: str, cond: Callable[[], bool], what: str) -> bool:
        t0 = time.monotonic()
        res = procs.tapproof("server", "ca", "rotate", name, "--data-dir", str(bed.srv.data_dir))
        if res.returncode != 0:
            steps.update(status="failed", detail=f"{name}: {res.stderr.strip()[-300:]}")
            log(f"[red]CA rotation {name} failed: {res.stderr.strip()[-200:]}")
            return False
        while not cond():
            if time.monotonic() > deadline:
                steps.update(status="failed", detail=f"{name}: timed out waiting for {what}")
                log(f"[red]CA rotation {name}: timed out waiting for {what}")
                return False
            time.sleep(1)
        steps[name] = round(time.monotonic() - t0, 1)
        log(f"CA rotation {name}: done in {steps[name]}s ({what})")
        return True

    issuers = {id(a): _leaf_issuer(a) for a in agents}
    if not step("prepare", lambda: all(_bundle_roots(a) >= 2 for a in agents), "both roots in every agent bundle"):
        return steps
    if not step(
        "activate", lambda: all(_leaf_issuer(a) != issuers[id(a)] for a in agents), "every agent leaf on the new root"
    ):
        return steps
    step("retire", lambda: all(_bundle_roots(a) == 1 for a in agents), "the old root gone from every agent bundle")
    return steps


def kill_and_restart(bed: loadkit.Bed, ledger: Ledger, log: Callable[[str], None]) -> dict[str, Any]:
    """``kill -9`` agent b, restart it on the same tunnel port; the fault window ends 10 s after it answers."""
    host, port = bed.b.tunnel
    old = bed.b
    ledger.fault = (time.monotonic(), float("inf"))
    ledger.fault_open = True
    old.proc.kill()
    old.proc.wait(10)
    killed = time.monotonic()
    log(f"agent b killed (pid {old.proc.pid})")
    new = None
    for _ in range(20):
        try:
            new = procs.start_agent(
                old.data_dir,
                None,
                "--service",
                f"echo=127.0.0.1:{bed.echo.port}",
                "--listen-tunnel",
                f"{host}:{port}",
                "--renew-fraction",
                str(bed_settings_fraction(bed)),
            )
            break
        except RuntimeError:
            time.sleep(0.5)  # the port may still be held for a moment
    if new is None:
        raise RuntimeError("agent b did not restart")
    bed.b = new
    bed.agents = [bed.a, new]
    procs.wait_for(lambda: _route_works(bed), 30, "a tunnel through the restarted agent")
    back = time.monotonic()
    ledger.fault = (ledger.fault[0], back + FAULT_GRACE)
    ledger.fault_open = False
    log(f"agent b restarted (pid {new.proc.pid}); tunnels again after {back - killed:.1f}s")
    return {"killed_pid": old.proc.pid, "restarted_pid": new.proc.pid, "recovery_seconds": round(back - killed, 2)}


def bed_settings_fraction(bed: loadkit.Bed) -> float:
    """The renew fraction the bed's agents were started with."""
    return float(getattr(bed, "renew_fraction", 0.5))


def _route_works(bed: loadkit.Bed) -> bool:
    try:
        loadkit.tunnel_once(bed.route, timeout=3)
    except OSError:
        return False
    return True


# --- sampling --------------------------------------------------------------------------------
def sample(bed: loadkit.Bed, t0: float) -> dict[str, Any]:
    """RSS (MiB), descriptors and threads of each process, at seconds since start."""
    row: dict[str, Any] = {"t": round(time.monotonic() - t0, 1)}
    for name, proc in (("server", bed.srv.proc), ("a", bed.a.proc), ("b", bed.b.proc)):
        with contextlib.suppress(OSError, AssertionError):
            row[name] = {
                "pid": proc.pid,
                "rss_mib": round(loadkit.rss(proc.pid) / 2**20, 2),
                "fds": loadkit.fds(proc.pid),
                "threads": loadkit.threads(proc.pid),
            }
    return row


def slope_kib_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in KiB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    if den == 0:
        return None
    return round(sum((p[0] - mx) * (p[1] - my) for p in points) / den * 1024 * 60, 1)


# --- the run ---------------------------------------------------------------------------------
def run(settings: Settings, console: Console | None = None) -> dict[str, Any]:
    """Run the soak; the result dict (see :mod:`soak.report`)."""
    console = console or Console(stderr=True)
    loadkit.raise_nofile(16384)
    tmp = Path(tempfile.mkdtemp(prefix="tapproof-soak-"))
    events: list[str] = []

    def log(msg: str) -> None:
        events.append(Text.from_markup(msg).plain)
        console.log(msg)

    fraction = settings.renew_fraction
    bed = loadkit.Bed(tmp, "--renew-fraction", str(fraction), leaf_ttl=LEAF_TTL)
    bed.renew_fraction = fraction  # type: ignore[attr-defined]
    ledger = Ledger()
    stop = threading.Event()
    samples: list[dict[str, Any]] = []
    rotation: dict[str, Any] = {"status": "not-run"}
    fault: dict[str, Any] = {}
    t0 = time.monotonic()
    until = t0 + settings.duration
    renewals0 = {n: _renewals(ag) for n, ag in (("a", bed.a), ("b", bed.b))}
    log(
        f"soak: {settings.duration:.0f}s, {settings.streams} streams, {settings.rate:g} new/s, leaf {LEAF_TTL},"
        f" renew at {fraction:.2f} of the lifetime; data in {tmp}"
    )

    def route() -> tuple[str, int]:
        return bed.route

    threads = [threading.Thread(target=long_stream, args=(i, route, ledger, stop)) for i in range(settings.streams)]
    threads.append(threading.Thread(target=new_connections, args=(route, settings.rate, until, ledger)))
    for t in threads:
        t.daemon = True
    for t in threads:
        t.start()
    rotate_at, kill_at = t0 + 0.4 * settings.duration, t0 + 0.65 * settings.duration
    rotated = killed = False
    renewals_before_kill: dict[str, float] = {}
    try:
        with Progress(
            TextColumn("[bold]soak"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("", total=settings.duration)
            next_sample = t0
            while time.monotonic() < until:
                now = time.monotonic()
                if now >= next_sample:
                    samples.append(sample(bed, t0))
                    next_sample += SAMPLE_EVERY
                if not rotated and now >= rotate_at:
                    rotated = True
                    rotation = rotate_ca(bed, log, deadline=min(until - 5, now + 0.25 * settings.duration + 60))
                elif not killed and now >= kill_at:
                    killed = True
                    renewals_before_kill["b"] = _renewals(bed.b)
                    fault = kill_and_restart(bed, ledger, log)
                    renewals0["b"] -= renewals_before_kill["b"]  # the counter restarts with the process
                progress.update(
                    task,
                    completed=min(settings.duration, now - t0),
                    description=f"ok {ledger.ok} failed {len(ledger.failures)} (outside fault {len(ledger.outside())})",
                )
                time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    samples.append(sample(bed, t0))
    renewals = {n: _renewals(ag) - renewals0[n] for n, ag in (("a", bed.a), ("b", bed.b))}
    alive = {n: p.poll() is None for n, p in (("server", bed.srv.proc), ("a", bed.a.proc), ("b", bed.b.proc))}
    bed.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return _result(settings, ledger, samples, rotation, fault, renewals, alive, events)


def _renewals(agent: procs.AgentProc) -> float:
    try:
        return agent.metric("tapproof_agent_renewals_total", result="success")
    except OSError:
        return 0.0


def _result(
    settings: Settings,
    ledger: Ledger,
    samples: list[dict[str, Any]],
    rotation: dict[str, Any],
    fault: dict[str, Any],
    renewals: dict[str, float],
    alive: dict[str, bool],
    events: list[str],
) -> dict[str, Any]:
    outside = ledger.outside()
    problems = [f"{kind} failed outside the fault window: {err}" for _t, kind, err in outside[:10]]
    if len(outside) > 10:
        problems.append(f"... {len(outside) - 10} more failures outside the fault window")
    problems += [f"agent {n} did not renew" for n, c in renewals.items() if c < 1]
    if rotation.get("status") == "failed":
        problems.append(f"CA rotation failed: {rotation.get('detail')}")
    problems += [f"{n} is not running at the end" for n, ok in alive.items() if not ok]
    per_process: dict[str, Any] = {}
    for name in ("server", "a", "b"):
        rows = [(s["t"], s[name]) for s in samples if name in s]
        if not rows:
            continue
        pids = sorted({r["pid"] for _t, r in rows}, key=[r["pid"] for _t, r in rows].index)
        segments = []
        for pid in pids:  # b has two lives; a slope across a restart means nothing
            seg = [(t, r) for t, r in rows if r["pid"] == pid]
            warm = [(t, r["rss_mib"]) for t, r in seg if t >= seg[0][0] + 0.1 * settings.duration]
            segments.append(
                {
                    "pid": pid,
                    "rss_mib_first": seg[0][1]["rss_mib"],
                    "rss_mib_last": seg[-1][1]["rss_mib"],
                    "rss_mib_max": max(r["rss_mib"] for _t, r in seg),
                    "rss_slope_kib_per_min": slope_kib_per_min(warm),
                    "fds_min": min(r["fds"] for _t, r in seg),
                    "fds_max": max(r["fds"] for _t, r in seg),
                    "fds_last": seg[-1][1]["fds"],
                    "threads_max": max(r["threads"] for _t, r in seg),
                }
            )
        per_process[name] = segments
    in_fault = len(ledger.failures) - len(outside)
    return {
        "passed": not problems,
        "problems": problems,
        "settings": dataclasses.asdict(settings) | {"leaf_ttl": LEAF_TTL, "renew_fraction": settings.renew_fraction},
        "requests_ok": ledger.ok,
        "failures_total": len(ledger.failures),
        "failures_in_fault_window": in_fault,
        "failures_outside_fault_window": len(outside),
        "stream_bytes_checked": ledger.stream_bytes,
        "new_connections_ok": len(ledger.setup_times),
        "new_connection_p50_ms": round(loadkit.percentile(ledger.setup_times, 0.5) * 1000, 1),
        "new_connection_p99_ms": round(loadkit.percentile(ledger.setup_times, 0.99) * 1000, 1),
        "renewals": renewals,
        "ca_rotation": rotation,
        "agent_kill": fault,
        "processes": per_process,
        "events": events,
        "load_average_end": round(os.getloadavg()[0], 1),
        "samples": samples,
    }
