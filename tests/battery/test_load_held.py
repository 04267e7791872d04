"""Load held: 1,000 idle tunnels through real agents, and 100 new tunnels per second beside them.

1,000 tunnels (app -> agent a's route -> b -> echo) are opened and held idle
for :data:`HOLD` seconds; meanwhile new tunnels open at 100 per second for
:data:`RATE_SECONDS` (each: connect, one echoed line, close). Asserted: no
held tunnel dropped (each still echoes at the end, and both agents count 1,000
live tunnels during the hold), zero failures among the new tunnels, and the
agents' descriptors back to their baseline once everything closed. Reported:
RSS per idle tunnel on each agent, and the new tunnels' p50/p99 setup time.

``make test`` runs a short form (30 s hold and rate); ``make soak`` runs the
full one (10 minutes held, 5 minutes of 100/s), marked ``soak``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.battery import loadkit
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELD = 1000
RATE = 100
OPEN_PARALLEL = 8


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[loadkit.Bed]:
    loadkit.raise_nofile(16384)  # the agents inherit it
    b = loadkit.Bed(tmp_path)
    try:
        yield b
    finally:
        b.close()


def _active(agent: procs.AgentProc, direction: str) -> float:
    return agent.metric("tapproof_agent_tunnels_active", direction=direction)


def _still_echoes(s: socket.socket) -> bool:
    try:
        s.sendall(b"ping\n")
        got = b""
        while len(got) < 5:
            part = s.recv(5 - len(got))
            if not part:
                return False
            got += part
        return got == b"ping\n"
    except OSError:
        return False


def run_load(bed: loadkit.Bed, hold: float, rate_seconds: float) -> dict[str, float]:
    """The scenario; returns the figures (also printed)."""
    loadkit.tunnel_once(bed.route)  # warm both agents
    time.sleep(1)
    pids = {"a": bed.a.proc.pid, "b": bed.b.proc.pid}
    base = {n: (loadkit.fds(p), loadkit.threads(p), loadkit.rss(p)) for n, p in pids.items()}

    held: list[socket.socket] = []
    open_times: list[float] = []
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(OPEN_PARALLEL) as pool:
            for elapsed, s in pool.map(lambda _i: loadkit.tunnel_once(bed.route, timeout=15, keep=True), range(HELD)):
                assert s is not None
                held.append(s)
                open_times.append(elapsed)
        opened_in = time.monotonic() - start
        procs.wait_for(lambda: _active(bed.b, "inbound") >= HELD, 30, "b to count every held tunnel")
        assert _active(bed.a, "outbound") >= HELD
        time.sleep(2)
        rss_held = {n: loadkit.rss(p) for n, p in pids.items()}
        per_tunnel = {n: (rss_held[n] - base[n][2]) / HELD for n in pids}

        hold_until = time.monotonic() + hold
        times, failures, submitted = loadkit.paced_tunnels(
            bed.route, RATE, time.monotonic() + rate_seconds, 32, timeout=15
        )
        time.sleep(max(0.0, hold_until - time.monotonic()))

        active_end = (_active(bed.a, "outbound"), _active(bed.b, "inbound"))
        dropped = sum(1 for s in held if not _still_echoes(s))
    finally:
        for s in held:
            with contextlib.suppress(OSError):
                s.close()
    figures = {
        "held": HELD,
        "hold_seconds": hold,
        "open_seconds": round(opened_in, 2),
        "dropped": dropped,
        "rss_per_idle_tunnel_a_kib": round(per_tunnel["a"] / 1024, 1),
        "rss_per_idle_tunnel_b_kib": round(per_tunnel["b"] / 1024, 1),
        "rss_a_mib": round(rss_held["a"] / 2**20, 1),
        "rss_b_mib": round(rss_held["b"] / 2**20, 1),
        "new_tunnels": len(times) + len(failures),
        "new_submitted": submitted,
        "new_failures": len(failures),
        "new_p50_ms": round(loadkit.percentile(times, 0.5) * 1000, 1),
        "new_p99_ms": round(loadkit.percentile(times, 0.99) * 1000, 1),
        "rate_seconds": rate_seconds,
        "load_average": round(os.getloadavg()[0], 1),
    }
    print("\nload held: " + json.dumps(figures))
    assert dropped == 0
    assert active_end[0] >= HELD
    assert active_end[1] >= HELD
    assert not failures, failures[:5]
    assert len(times) == submitted  # every new tunnel submitted echoed
    planned = int(RATE * rate_seconds)  # the pacing starts a moment after its end time was set: it may submit fewer
    assert planned - RATE <= submitted <= planned + 1, (submitted, planned)
    for n, p in pids.items():
        fds0, threads0, _ = base[n]
        loadkit.settle(p, fds0, threads0, timeout=30)
    assert bed.a.proc.poll() is None
    assert bed.b.proc.poll() is None
    return figures


def test_1000_idle_tunnels_held_with_100_new_per_second(bed: loadkit.Bed) -> None:
    run_load(bed, hold=30.0, rate_seconds=30.0)


@pytest.mark.soak
def test_1000_idle_tunnels_held_10_minutes_with_5_minutes_of_100_new_per_second(bed: loadkit.Bed) -> None:
    figures = run_load(bed, hold=600.0, rate_seconds=300.0)
    out = Path("bench/results")
    if out.is_dir():
        (out / "load-held.json").write_text(json.dumps(figures, indent=2) + "\n")
