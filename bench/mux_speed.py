"""Classic tunnels vs ``--mux`` streams through two real agents, side by side in one run.

One control plane, one server agent ``b`` (an echo service, a sink, an idle
holder) and two client agents: ``classic`` (one TLS connection per tunnel) and
``mux`` (``--mux``: streams over pooled agent-pair connections). Measures, for
each: new connections/s (connect + 64 B request/response + close) at
concurrency 1 and 8, one-way throughput over 1 and 4 streams, and agent RSS
per idle tunnel at 1,000 (and, for mux, 10,000: the descriptor limit is raised
here, root needed above the hard limit). The load average is printed with each
figure: the machine is shared. Bounded: every phase has a count AND a time cap.

Usage: ``python bench/mux_speed.py [--idle 1000,10000] [--seconds 6]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration import procs


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Holder:
    """Accepts and holds connections with one selector thread (a sink too: reads and counts)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.bytes = 0
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        buf = bytearray(1 << 20)
        while not self._stop:
            for key, _ in sel.select(0.2):
                if key.fileobj is self.sock:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            c, _ = self.sock.accept()
                            c.setblocking(False)
                            self.conns.append(c)
                            sel.register(c, selectors.EVENT_READ)
                else:
                    c = key.fileobj
                    try:
                        n = c.recv_into(buf)  # type: ignore[union-attr]
                    except OSError:
                        n = 0
                    if n:
                        self.bytes += n
                    else:
                        sel.unregister(c)
                        c.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop = True


def conn_rate(addr: tuple[str, int], conc: int, total: int, cap: float) -> tuple[float, int, int]:
    done = [0]
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + cap
    msg = b"x" * 64

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if done[0] + errors[0] >= total:
                    return
            try:
                with socket.create_connection(addr, timeout=10) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.sendall(msg)
                    got = b""
                    while len(got) < 64:
                        chunk = s.recv(64 - len(got))
                        if not chunk:
                            raise OSError("eof")
                        got += chunk
                with lock:
                    done[0] += 1
            except OSError:
                with lock:
                    errors[0] += 1

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done[0] / (time.monotonic() - t0), done[0], errors[0]


def throughput(addr: tuple[str, int], sink: Holder, streams: int, seconds: float) -> float:
    chunk = os.urandom(256 * 1024)
    stop = time.monotonic() + seconds

    def send() -> None:
        with socket.create_connection(addr, timeout=10) as s:
            while time.monotonic() < stop:
                s.sendall(chunk)

    before = sink.bytes
    t0 = time.monotonic()
    ts = [threading.Thread(target=send) for _ in range(streams)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    time.sleep(0.3)
    return (sink.bytes - before) * 8 / (time.monotonic() - t0) / 1e9


def idle(agent: procs.AgentProc, server: procs.AgentProc, addr: tuple[str, int], n: int) -> tuple[float, float]:
    socks = []
    try:
        socks.extend(socket.create_connection(addr, timeout=10) for _ in range(20))
        time.sleep(1.0)
        base = rss_kib(agent.proc.pid), rss_kib(server.proc.pid)
        t0 = time.monotonic()
        for _ in range(n):
            if time.monotonic() - t0 > 120:
                break
            socks.append(socket.create_connection(addr, timeout=10))
        held = len(socks) - 20
        procs.wait_for(lambda: len(server.status().get("peers", [])) >= 0, 5, "status")
        time.sleep(3.0)
        after = rss_kib(agent.proc.pid), rss_kib(server.proc.pid)
        return (after[0] - base[0]) / held, (after[1] - base[1]) / held
    finally:
        for s in socks:
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", default="1000,10000")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--only", default="conn,throughput,idle")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (200_000, max(hard, 200_000)))
    print("fd limit", resource.getrlimit(resource.RLIMIT_NOFILE))
    tmp = Path(tempfile.mkdtemp(prefix="muxbench-"))
    echo = procs.EchoServer()
    hold = Holder()
    srv = procs.start_server(tmp / "srv")
    agents = []
    try:
        b = procs.start_agent(
            tmp / "b",
            srv.token("b"),
            "--service",
            f"echo=127.0.0.1:{echo.port}",
            "--service",
            f"hold=127.0.0.1:{hold.port}",
        )
        agents.append(b)
        routes = ("--route", "127.0.0.1:0=echo@b", "--route", "127.0.0.1:0=hold@b")
        clients = {
            "classic": procs.start_agent(tmp / "classic", srv.token("classic"), *routes),
            "mux": procs.start_agent(tmp / "mux", srv.token("mux"), "--mux", *routes),
        }
        agents += clients.values()
        for a in clients.values():
            procs.wait_for(lambda a=a: "b" in a.status()["registry_hosts"], 20, "b's address")
        for name, a in clients.items():
            if "conn" not in args.only:
                break
            conn_rate(a.route(0), 2, 50, 10)  # warm-up
            for conc, total in ((1, 1500), (8, 3000)):
                c0 = cpu_s(a.proc.pid), cpu_s(b.proc.pid)
                rate, ok, err = conn_rate(a.route(0), conc, total, 12)
                c1 = cpu_s(a.proc.pid), cpu_s(b.proc.pid)
                per = [(x1 - x0) / max(ok, 1) * 1000 for x0, x1 in zip(c0, c1, strict=True)]
                print(
                    f"{name:8s} conn/s c{conc}: {rate:7.0f} ({ok} ok, {err} errors; CPU/conn client "
                    f"{per[0]:.2f} ms, server {per[1]:.2f} ms) [{load()}]",
                    flush=True,
                )
        for name, a in clients.items():
            if "throughput" not in args.only:
                break
            for streams in (1, 4):
                g = throughput(a.route(1), hold, streams, args.seconds)
                print(f"{name:8s} one-way {streams} stream(s): {g:5.2f} Gbit/s [{load()}]", flush=True)
        fd_room = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1000) // 2  # this process holds both ends
        for n in [min(int(x), fd_room) for x in args.idle.split(",") if x]:
            for name, a in clients.items():
                if "idle" not in args.only or (name == "classic" and n > 1000):
                    continue
                per = idle(a, b, a.route(1), n)
                print(
                    f"{name:8s} RSS per idle tunnel at {n}: client agent {per[0]:.1f} KiB, server agent "
                    f"{per[1]:.1f} KiB [{load()}]",
                    flush=True,
                )
                time.sleep(3)
    finally:
        for a in agents:
            with contextlib.suppress(Exception):
                a.stop()
        srv.stop()
        echo.close()
        hold.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
