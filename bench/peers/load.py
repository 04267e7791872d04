"""The load side of the side-by-side benchmark: a tiny echo backend and three clients.

Run as ``python -m bench.peers.load MODE ...``, each in its own process so the
clients never share a GIL with the harness (rich's refresh thread, /proc reads).
All of them are single-threaded ``epoll`` loops on non-blocking sockets: on a
2-core machine shared with the tunnels under test that is the cheapest load
Python can generate (no thread switch per connection, no asyncio overhead),
and one process per role keeps the count of moving parts small.

* ``echo``      echo backend on 127.0.0.1 (prints its port): echoes whatever it reads,
                closes when the peer closes. Exits when its parent dies or after ``--max-seconds``.
* ``cps``       new connections per second: ``--count`` connections, ``--concurrency`` in
                flight; each is connect + 64-byte request + 64-byte response + close.
* ``pingpong``  ``--rounds`` 64-byte round trips over one connection; percentiles in microseconds.
* ``idle``      opens connections up to each of ``--steps`` (each exchanges one byte so the
                tunnel is established end to end), drops those the tunnel closed since, prints one
                JSON line per step and waits for a line on stdin before the next step.

Every client prints one JSON object per result on stdout and is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from typing import Any

MSG = b"q" * 64
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root may raise the hard limit); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((want, max(want, hard)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            return target[0]
        except (ValueError, OSError):
            continue
    return soft


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------- echo backend
def echo(max_seconds: float) -> int:
    """Serve echo on an ephemeral port until the parent dies or ``max_seconds`` pass."""
    raise_nofile()
    lsock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    lsock.setblocking(False)
    _emit({"port": lsock.getsockname()[1]})
    parent = os.getppid()
    ep = select.epoll()
    ep.register(lsock.fileno(), _IN)
    conns: dict[int, socket.socket] = {}
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    deadline = time.monotonic() + max_seconds
    lfd = lsock.fileno()

    def drop(fd: int) -> None:
        s = conns.pop(fd)
        ep.unregister(fd)
        s.close()

    while time.monotonic() < deadline and os.getppid() == parent:
        for fd, _ev in ep.poll(1.0):
            if fd == lfd:
                for _ in range(256):
                    try:
                        c, _addr = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE and friends: back off this round
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[c.fileno()] = c
                    ep.register(c.fileno(), _IN)
                continue
            s = conns.get(fd)
            if s is None:
                continue
            try:
                n = s.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                drop(fd)
                continue
            if n == 0:
                drop(fd)
                continue
            try:
                sent = s.send(view[:n])
                if sent < n:  # rare for small messages: finish blocking (bounded by the socket timeout)
                    s.settimeout(10)
                    s.sendall(view[sent:n])
                    s.setblocking(False)
            except OSError:
                drop(fd)
    return 0


# ------------------------------------------------------------------------- clients
def _new_conn(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = s.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS):
        s.close()
        raise OSError(err, os.strerror(err))
    return s


def cps(addr: tuple[str, int], count: int, concurrency: int, timeout: float) -> dict[str, Any]:
    """``count`` connect + 64 B request + 64 B response + close, ``concurrency`` at a time."""
    ep = select.epoll()
    live: dict[int, list[Any]] = {}  # fd -> [sock, state (0 connecting, 1 reading), received, t0]
    started = done = failed = 0
    errors: dict[str, int] = {}
    durations: list[float] = []
    buf = bytearray(256)
    t_start = time.monotonic()
    deadline = t_start + timeout

    def launch() -> None:
        nonlocal started, failed
        started += 1
        try:
            s = _new_conn(addr)
        except OSError as exc:
            failed += 1
            errors[str(exc)] = errors.get(str(exc), 0) + 1
            return
        live[s.fileno()] = [s, 0, 0, time.monotonic()]
        ep.register(s.fileno(), _OUT)

    def finish(fd: int, ok: bool, why: str = "") -> None:
        nonlocal done, failed
        st = live.pop(fd)
        ep.unregister(fd)
        st[0].close()
        if ok:
            done += 1
            durations.append(time.monotonic() - st[3])
        else:
            failed += 1
            errors[why] = errors.get(why, 0) + 1

    while started < min(concurrency, count):
        launch()
    while live and time.monotonic() < deadline:
        for fd, _ev in ep.poll(0.5):
            st = live.get(fd)
            if st is None:
                continue
            s = st[0]
            if st[1] == 0:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(fd, False, os.strerror(err))
                else:
                    try:
                        s.send(MSG)
                        st[1] = 1
                        ep.modify(fd, _IN)
                        continue
                    except OSError as exc:
                        finish(fd, False, type(exc).__name__)
            else:
                try:
                    n = s.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    finish(fd, False, type(exc).__name__)
                else:
                    if n == 0:
                        finish(fd, False, "closed before the response")
                    else:
                        st[2] += n
                        if st[2] < len(MSG):
                            continue
                        finish(fd, True)
            if started < count and time.monotonic() < deadline:
                launch()
        while len(live) < concurrency and started < count and time.monotonic() < deadline:
            launch()  # refill after failures at launch
    elapsed = time.monotonic() - t_start
    for fd in list(live):
        finish(fd, False, "timed out")
    durations.sort()
    return {
        "done": done,
        "failed": failed,
        "seconds": round(elapsed, 4),
        "per_second": round(done / elapsed, 1) if elapsed > 0 else None,
        "timed_out": elapsed >= timeout,
        "conn_ms_p50": round(durations[len(durations) // 2] * 1000, 3) if durations else None,
        "errors": errors,
    }


def _percentile(sorted_vals: list[int], q: float) -> float:
    i = min(len(sorted_vals) - 1, max(0, round(q * len(sorted_vals)) - 1))
    return sorted_vals[i] / 1000.0


def pingpong(addr: tuple[str, int], rounds: int, timeout: float) -> dict[str, Any]:
    """``rounds`` 64-byte round trips over one connection (after 200 warm-up rounds)."""
    s = socket.create_connection(addr, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(5)
    buf = bytearray(64)
    view = memoryview(buf)
    samples: list[int] = []
    deadline = time.monotonic() + timeout
    clock = time.perf_counter_ns
    with s:
        for i in range(rounds + 200):
            if not i & 0xFF and time.monotonic() > deadline:
                break
            t0 = clock()
            s.sendall(MSG)
            got = 0
            while got < 64:
                n = s.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("closed during ping-pong")
                got += n
            if i >= 200:
                samples.append(clock() - t0)
    samples.sort()
    if not samples:
        return {"rounds": 0}
    return {
        "rounds": len(samples),
        "p50_us": _percentile(samples, 0.50),
        "p99_us": _percentile(samples, 0.99),
        "p999_us": _percentile(samples, 0.999),
        "mean_us": round(sum(samples) / len(samples) / 1000.0, 3),
        "timed_out": len(samples) < rounds,
    }


def idle(addr: tuple[str, int], steps: list[int], window: int, timeout: float) -> int:
    """Open connections up to each step (one byte each way), report, wait for a stdin line."""
    raise_nofile()
    held: list[socket.socket] = []
    ep = select.epoll()
    deadline = time.monotonic() + timeout
    errors: dict[str, int] = {}
    try:
        for target in steps:
            t0 = time.monotonic()
            pending: dict[int, list[Any]] = {}
            attempts = failed = 0
            cap = 3 * target  # a bounded number of attempts
            while (len(held) < target or pending) and time.monotonic() < deadline:
                while len(pending) < window and len(held) + len(pending) < target and attempts < cap:
                    attempts += 1
                    try:
                        s = _new_conn(addr)
                    except OSError as exc:
                        failed += 1
                        errors[exc.strerror or str(exc)] = errors.get(exc.strerror or str(exc), 0) + 1
                        time.sleep(0.01)
                        continue
                    pending[s.fileno()] = [s, 0]
                    ep.register(s.fileno(), _OUT)
                if not pending:
                    break
                for fd, _ev in ep.poll(0.5):
                    st = pending.get(fd)
                    if st is None:
                        continue
                    s = st[0]
                    try:
                        if st[1] == 0:
                            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                            if err:
                                raise OSError(err, os.strerror(err))
                            s.send(b"i")
                            st[1] = 1
                            ep.modify(fd, _IN)
                            continue
                        if s.recv(16):
                            ep.unregister(fd)
                            del pending[fd]
                            held.append(s)
                            continue
                        raise OSError(0, "closed before the echo")
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        ep.unregister(fd)
                        del pending[fd]
                        s.close()
                        failed += 1
                        key = exc.strerror or type(exc).__name__
                        errors[key] = errors.get(key, 0) + 1
            for fd, st in list(pending.items()):
                ep.unregister(fd)
                st[0].close()
                failed += 1
            pending.clear()
            # settle, then keep only the connections the tunnel still holds open (a peer that
            # drops connections past its limit must not count them as held)
            time.sleep(1.0)
            alive: list[socket.socket] = []
            for s in held:
                try:
                    still = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
                except (BlockingIOError, InterruptedError):
                    still = True
                except OSError:
                    still = False
                if still:
                    alive.append(s)
                else:
                    s.close()
            dropped = len(held) - len(alive)
            held = alive
            _emit(
                {
                    "step": target,
                    "open": len(held),
                    "failed": failed,
                    "dropped": dropped,
                    "seconds": round(time.monotonic() - t0, 2),
                    "errors": errors,
                    "timed_out": time.monotonic() >= deadline,
                }
            )
            # the harness reads RSS now; it answers with one line (or closes stdin: stop)
            if not sys.stdin.readline():
                break
    finally:
        for s in held:
            s.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch one load role."""
    p = argparse.ArgumentParser(prog="python -m bench.peers.load")
    p.add_argument("mode", choices=["echo", "cps", "pingpong", "idle"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20000)
    p.add_argument("--steps", default="1000,10000")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--max-seconds", type=float, default=4 * 3600.0)
    a = p.parse_args(argv)
    addr = ("127.0.0.1", a.port)
    if a.mode == "echo":
        return echo(a.max_seconds)
    if a.mode == "cps":
        _emit(cps(addr, a.count, a.concurrency, a.timeout))
    elif a.mode == "pingpong":
        _emit(pingpong(addr, a.rounds, a.timeout))
    else:
        return idle(addr, [int(x) for x in a.steps.split(",")], a.window, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
