"""Relay design measurement: plain client -> relay -> TLS -> relay -> plain server.

Reproduces the figures in ``tapproof.tunnel.relay``'s docstring. Each
candidate runs the two relays in two forked processes ("client agent",
"server agent") while this process is the application client and the service,
sending ``--bytes`` per connection in BOTH directions at once, over 1 and over
4 parallel connections. Mutual TLS 1.3 restricted to X25519MLKEM768, ECDSA
P-256 certificates made here. Bounded: fixed byte counts and ``--time-cap``
seconds per run (a run that hits the cap is reported as such).

Candidates:

* ``plain``       stdlib sockets, two blocking threads per connection (the limit)
* ``poll-cffi``   tapproof.tunnel.relay.Relay: one thread, poll, direct SSL_read/SSL_write
* ``poll-pyossl`` the same loop through pyOpenSSL's ``recv_into``/``send`` API
* ``2t-lock``     two threads per connection, non-blocking SSL under a lock, cffi calls

Usage: ``python bench/relay_speed.py [--bytes 256M] [--runs 3] [--only poll-cffi,plain]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from tests.integration.tlspair import (
    Credentials,
    make_context,
    make_credentials,
    tls_accept,
    tls_connect,
)

from tapproof.tunnel.relay import DEFAULT_BUFFER_SIZE, Relay

CHUNK = DEFAULT_BUFFER_SIZE


# ---------------------------------------------------------------- candidate relays
def relay_plain(a: socket.socket, b: socket.socket) -> None:
    """Two blocking threads, recv_into + sendall."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        while n := src.recv_into(buf):
            dst.sendall(mv[:n])
        dst.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=pump, args=(b, a))
    t.start()
    pump(a, b)
    t.join()
    a.close()
    b.close()


def relay_poll_cffi(plain: socket.socket, tls: SSL.Connection) -> None:
    """The production relay."""
    Relay(plain, tls, idle_timeout=30).run()


def relay_poll_pyossl(plain: socket.socket, tls: SSL.Connection) -> None:
    """One thread, poll, pyOpenSSL's recv_into/send (no half-close subtleties)."""
    plain.setblocking(False)
    tls.setblocking(False)
    ubuf = bytearray(CHUNK)
    umv = memoryview(ubuf)
    dbuf = bytearray(CHUNK)
    dmv = memoryview(dbuf)
    ulen = uoff = dlen = doff = 0
    up_eof = up_done = down_eof = down_done = False
    p = select.poll()
    while not (up_done and down_done):
        moved = False
        if ulen == 0 and not up_eof:
            try:
                ulen, uoff = plain.recv_into(umv), 0
                up_eof = ulen == 0
                moved = True
            except BlockingIOError:
                pass
        if ulen > uoff:
            try:
                uoff += tls.send(umv[uoff:ulen])
                moved = True
                if uoff == ulen:
                    ulen = uoff = 0
            except (SSL.WantReadError, SSL.WantWriteError):
                pass
        elif up_eof and not up_done:
            tls.shutdown()
            up_done = moved = True
        if dlen == 0 and not down_eof:
            try:
                dlen, doff = tls.recv_into(dbuf), 0
                moved = True
            except (SSL.WantReadError, SSL.WantWriteError):
                pass
            except SSL.ZeroReturnError:
                down_eof = moved = True
        if dlen > doff:
            try:
                doff += plain.send(dmv[doff:dlen])
                moved = True
                if doff == dlen:
                    dlen = doff = 0
            except BlockingIOError:
                pass
        elif down_eof and not down_done:
            plain.shutdown(socket.SHUT_WR)
            down_done = moved = True
        if not moved:
            p.register(plain, (select.POLLIN if ulen == 0 and not up_eof else 0) | select.POLLOUT * (dlen > doff))
            p.register(tls, select.POLLIN | select.POLLOUT * (ulen > uoff))
            p.poll(1000)
    plain.close()
    tls.close()


def relay_two_threads_lock(plain: socket.socket, tls: SSL.Connection) -> None:
    """One thread per direction; every SSL call under one lock, never held while waiting."""
    ssl = tls._ssl
    lock = threading.Lock()
    tls.setblocking(False)
    lib.SSL_clear_mode(ssl, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    fd = tls.fileno()

    def wait(events: int) -> None:
        p = select.poll()
        p.register(fd, events)
        p.poll(1000)

    def up() -> None:
        buf = ffi.new("char[]", CHUNK)
        mv = memoryview(ffi.buffer(buf))
        while n := plain.recv_into(mv):
            off = 0
            while off < n:
                with lock:
                    r = lib.SSL_write(ssl, buf + off, n - off)
                    err = lib.SSL_get_error(ssl, r) if r <= 0 else 0
                if r > 0:
                    off += r
                elif err in (lib.SSL_ERROR_WANT_WRITE, lib.SSL_ERROR_WANT_READ):
                    wait(select.POLLOUT if err == lib.SSL_ERROR_WANT_WRITE else select.POLLIN)
                else:
                    raise OSError(f"ssl write error {err}")
        while True:
            with lock:
                r = lib.SSL_shutdown(ssl)
            if r >= 0:
                return
            wait(select.POLLOUT)

    def down() -> None:
        buf = ffi.new("char[]", CHUNK)
        mv = memoryview(ffi.buffer(buf))
        while True:
            with lock:
                r = lib.SSL_read(ssl, buf, CHUNK)
                err = lib.SSL_get_error(ssl, r) if r <= 0 else 0
            if r > 0:
                plain.sendall(mv[:r])
            elif err == lib.SSL_ERROR_ZERO_RETURN:
                plain.shutdown(socket.SHUT_WR)
                return
            elif err in (lib.SSL_ERROR_WANT_READ, lib.SSL_ERROR_WANT_WRITE):
                wait(select.POLLIN if err == lib.SSL_ERROR_WANT_READ else select.POLLOUT)
            else:
                raise OSError(f"ssl read error {err}")

    t = threading.Thread(target=down)
    t.start()
    up()
    t.join()
    plain.close()
    tls.close()


CANDIDATES: dict[str, Callable[[Any, Any], None] | None] = {
    "plain": None,  # special-cased: no TLS at all
    "poll-cffi": relay_poll_cffi,
    "poll-pyossl": relay_poll_pyossl,
    "2t-lock": relay_two_threads_lock,
}


# ---------------------------------------------------------------- the two agents
def _nodelay(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def client_agent(name: str, creds: Credentials, lsock: socket.socket, peer: tuple[str, int], conns: int) -> None:
    """Accept ``conns`` app connections; tunnel each to the server agent."""
    ctx = make_context(creds, server=False)
    threads = []
    for _ in range(conns):
        app, _ = lsock.accept()
        _nodelay(app)
        if name == "plain":
            args: tuple[Any, Any] = (app, _nodelay(socket.create_connection(peer)))
            target: Callable[..., None] = relay_plain
        else:
            fn = CANDIDATES[name]
            assert fn is not None
            args, target = (app, tls_connect(ctx, peer)), fn
        t = threading.Thread(target=target, args=args)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    os._exit(0)


def server_agent(name: str, creds: Credentials, lsock: socket.socket, svc: tuple[str, int], conns: int) -> None:
    """Accept ``conns`` tunnels; connect each to the service."""
    ctx = make_context(creds, server=True)
    threads = []
    for _ in range(conns):
        s, _ = lsock.accept()
        if name == "plain":
            args: tuple[Any, Any] = (_nodelay(s), _nodelay(socket.create_connection(svc)))
            target: Callable[..., None] = relay_plain
        else:
            fn = CANDIDATES[name]
            assert fn is not None
            tls = tls_accept(ctx, s)
            args, target = (_nodelay(socket.create_connection(svc)), tls), fn
        t = threading.Thread(target=target, args=args)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    os._exit(0)


# ---------------------------------------------------------------- source and sink
def _pump_out(s: socket.socket, nbytes: int, block: bytes) -> None:
    mv = memoryview(block)
    left = nbytes
    while left > 0:
        n = min(left, len(block))
        s.sendall(mv[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)


def _pump_in(s: socket.socket, counts: list[int], i: int) -> None:
    buf = bytearray(1 << 20)
    total = 0
    while n := s.recv_into(buf):
        total += n
    counts[i] = total


def run_once(name: str, creds: Credentials, conns: int, nbytes: int, cap: float) -> float | None:
    """Gbit/s (both directions summed) for one candidate, or None if the cap was hit."""
    mp = multiprocessing.get_context("fork")
    svc_l = socket.create_server(("127.0.0.1", 0), backlog=64)
    b_l = socket.create_server(("127.0.0.1", 0), backlog=64)
    a_l = socket.create_server(("127.0.0.1", 0), backlog=64)
    pb = mp.Process(target=server_agent, args=(name, creds, b_l, svc_l.getsockname(), conns))
    pa = mp.Process(target=client_agent, args=(name, creds, a_l, b_l.getsockname(), conns))
    pb.start()
    pa.start()
    a_addr = a_l.getsockname()
    b_l.close()
    a_l.close()
    block = os.urandom(1 << 20)
    counts = [0] * (2 * conns)
    socks: list[socket.socket] = []
    pumps: list[threading.Thread] = []
    t0 = time.perf_counter()
    try:
        apps = [_nodelay(socket.create_connection(a_addr)) for _ in range(conns)]
        svcs = [_nodelay(svc_l.accept()[0]) for _ in range(conns)]
        socks = apps + svcs
        t0 = time.perf_counter()
        for i, s in enumerate(socks):
            pumps.append(threading.Thread(target=_pump_out, args=(s, nbytes, block), daemon=True))
            pumps.append(threading.Thread(target=_pump_in, args=(s, counts, i), daemon=True))
        for t in pumps:
            t.start()
        deadline = t0 + cap
        for t in pumps:
            t.join(max(0.0, deadline - time.perf_counter()))
        elapsed = time.perf_counter() - t0
        done = all(not t.is_alive() for t in pumps) and all(c == nbytes for c in counts)
    finally:
        for s in socks:
            s.close()
        svc_l.close()
        for p in (pa, pb):
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
    if not done:
        return None
    return 2 * conns * nbytes * 8 / elapsed / 1e9


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main(argv: list[str] | None = None) -> int:
    """Measure every candidate with 1 and 4 connections; print Gbit/s."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bytes", type=_size, default=_size("256M"), help="per connection, each way")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--conns", default="1,4")
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--time-cap", type=float, default=60.0, help="seconds per run")
    args = ap.parse_args(argv)
    creds = make_credentials()
    conns_list = [int(c) for c in args.conns.split(",")]
    print(f"bytes per connection each way: {args.bytes}, runs: {args.runs}, cpus: {os.cpu_count()}")
    print(f"{'design':<14}" + "".join(f"{f'{c} conn Gbit/s':>20}" for c in conns_list))
    for name in args.only.split(","):
        cells = []
        for conns in conns_list:
            results = [run_once(name, creds, conns, args.bytes, args.time_cap) for _ in range(args.runs)]
            ok = [r for r in results if r is not None]
            if not ok:
                cells.append("capped")
                continue
            spread = f"({min(ok):.2f}-{max(ok):.2f})"
            cells.append(f"{statistics.median(ok):.2f} {spread}")
        print(f"{name:<14}" + "".join(f"{c:>20}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
