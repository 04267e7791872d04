"""Shared plumbing for the abuse, slowloris and load tests (and the soak driver).

- :class:`Bed`: one real control plane and two real agents on 127.0.0.1:
  ``b`` fronts a :class:`CountingEcho` as ``echo``, ``a`` routes
  ``127.0.0.1:0=echo@b``. App -> a (route) == mTLS ==> b (tunnel port) -> echo.
- :class:`CountingEcho`: an echo service in ONE selector thread (thousands of
  idle connections cost no thread) that counts the connections it accepted.
- ``/proc`` readers (RSS, peak RSS, descriptors, threads) and a descriptor
  limit raiser for tests that hold thousands of sockets.
- A real ClientHello (pyOpenSSL, X25519MLKEM768 key share) and one grown to
  any size with an unknown extension, split into records.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import resource
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from OpenSSL import SSL

from tapproof import identity
from tapproof.pki.ca import load_ca
from tapproof.tls import context
from tapproof.tls.credentials import Credentials
from tests.integration import procs


# --- /proc ---------------------------------------------------------------------------------
def _status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def rss(pid: int) -> int:
    """Resident set size in bytes."""
    return _status_field(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    """Peak resident set size (VmHWM) in bytes since start or the last :func:`reset_peak`."""
    return _status_field(pid, "VmHWM") * 1024


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``; own processes or root)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def fds(pid: int) -> int:
    """Open descriptors."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def threads(pid: int) -> int:
    """Threads."""
    return _status_field(pid, "Threads")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used, in seconds."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile(want: int) -> int:
    """Raise this process's soft descriptor limit to ``want`` (at most the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def settle(
    pid: int, baseline_fds: int, baseline_threads: int, timeout: float = 30.0, slack: int = 5
) -> tuple[int, int]:
    """Wait until the process's descriptors and threads are back within ``slack`` of the baseline."""

    def back() -> tuple[int, int] | None:
        now = fds(pid), threads(pid)
        return now if now[0] <= baseline_fds + slack and now[1] <= baseline_threads + slack else None

    try:
        return procs.wait_for(back, timeout, "descriptors and threads back to baseline", step=0.5)  # type: ignore[no-any-return]
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: fds {fds(pid)} (baseline {baseline_fds}), threads {threads(pid)} (baseline {baseline_threads})"
        ) from None


# --- services -------------------------------------------------------------------------------
class CountingEcho:
    """Echo service on 127.0.0.1 in one selector thread; ``accepted`` counts connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.open = 0
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="counting-echo", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.2):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        while True:
                            conn, _addr = self.sock.accept()
                            conn.setblocking(False)
                            self.accepted += 1
                            self.open += 1
                            self._sel.register(conn, selectors.EVENT_READ, "c")
                    continue
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    data = conn.recv(65536)
                    if data:
                        conn.setblocking(True)  # echo payloads in these tests are small
                        conn.settimeout(5)
                        conn.sendall(data)
                        conn.setblocking(False)
                        continue
                except OSError:
                    pass
                self._sel.unregister(conn)
                conn.close()
                self.open -= 1

    def close(self) -> None:
        """Stop and close every connection."""
        self._stop.set()
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()


# --- the bed ---------------------------------------------------------------------------------
class Bed:
    """A server, agent ``b`` fronting ``echo`` (a :class:`CountingEcho`), agent ``a`` routing to it."""

    def __init__(self, tmp: Path, *agent_args: str, leaf_ttl: str = "1h") -> None:
        self.tmp = tmp
        self.echo = CountingEcho()
        self.srv = procs.start_server(tmp / "srv", leaf_ttl=leaf_ttl)
        self.agents: list[procs.AgentProc] = []
        try:
            self.b = procs.start_agent(
                tmp / "b", self.srv.token("b"), "--service", f"echo=127.0.0.1:{self.echo.port}", *agent_args
            )
            self.agents.append(self.b)
            self.a = procs.start_agent(tmp / "a", self.srv.token("a"), "--route", "127.0.0.1:0=echo@b", *agent_args)
            self.agents.append(self.a)
            procs.wait_for(lambda: "b" in self.a.status()["registry_hosts"], 20, "a to learn b's address")
        except BaseException:
            self.close()
            raise

    @property
    def route(self) -> tuple[str, int]:
        """Agent a's route to ``echo@b``."""
        return self.a.route(0)

    @property
    def api(self) -> tuple[str, int]:
        """The control plane's API address."""
        host, port = self.srv.listen.rsplit(":", 1)
        return host, int(port)

    def client_creds(self, name: str, lifetime: dt.timedelta = dt.timedelta(hours=1)) -> Credentials:
        """Host credentials issued by the server's CA (a host that never enrolled: the agents accept it)."""
        ca = load_ca(self.srv.data_dir, "example.org")
        return ca.credentials_for(identity.host_id("example.org", name), dt.datetime.now(dt.UTC), lifetime)

    def client_context(self, name: str) -> SSL.Context:
        """A client context with :meth:`client_creds` that trusts the fleet's root."""
        ca = load_ca(self.srv.data_dir, "example.org")
        return context.client_context(self.client_creds(name), ca.bundle)

    def close(self) -> None:
        """Stop everything this bed started."""
        for agent in self.agents:
            agent.stop()
        self.srv.stop()
        self.echo.close()


def tunnel_once(addr: tuple[str, int], timeout: float = 10.0, keep: bool = False) -> tuple[float, socket.socket | None]:
    """Open a tunnel through a route and echo one line: (setup seconds, the socket if ``keep``).

    Setup is from ``connect()`` to the echoed line: the route's accept, a's TLS
    handshake to b, the CONNECT exchange, b's connect to the service and one round trip.
    """
    start = time.monotonic()
    s = socket.create_connection(addr, timeout=timeout)
    try:
        s.settimeout(timeout)
        s.sendall(b"ping\n")
        got = b""
        while len(got) < 5:
            part = s.recv(5 - len(got))
            if not part:
                raise ConnectionError(f"tunnel closed after {got!r}")
            got += part
        if got != b"ping\n":
            raise ConnectionError(f"echo answered {got!r}")
        elapsed = time.monotonic() - start
    except BaseException:
        s.close()
        raise
    if keep:
        return elapsed, s
    s.close()
    return elapsed, None


def paced_tunnels(
    route: tuple[str, int], rate: float, until: float, workers: int, timeout: float = 10.0
) -> tuple[list[float], list[str], int]:
    """:func:`tunnel_once` ``rate`` times per second until the monotonic time ``until``.

    Returns (setup times, failures, tunnels submitted): every submitted tunnel
    ends in exactly one of the two lists. The number submitted is
    ``rate`` x the seconds left when the pacing starts, so a caller that
    computed ``until`` a moment earlier may see one fewer than it planned.
    Bounded in count (rate x remaining seconds) and in time (each tunnel's ``timeout``).
    """
    times: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            elapsed, _ = tunnel_once(route, timeout=timeout)
        except OSError as exc:
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
            return
        with lock:
            times.append(elapsed)

    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        i = 0
        while (due := start + i / rate) < until:
            time.sleep(max(0.0, due - time.monotonic()))
            pool.submit(one)
            i += 1
    return times, failures, i


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1, nearest rank) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


# --- ClientHellos -----------------------------------------------------------------------------
def client_hello(ctx: SSL.Context | None = None) -> bytes:
    """The first flight of a real pyOpenSSL client (TLS 1.3, X25519MLKEM768 share): TLS records."""
    if ctx is None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        from OpenSSL._util import lib

        lib.SSL_CTX_set1_curves_list(ctx._context, context.PQ_GROUP.encode())
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(1 << 20)


def grown_client_hello(size: int, base: bytes | None = None) -> bytes:
    """A real ClientHello grown to about ``size`` bytes with unknown extensions, in records of 16 KiB.

    Extension bodies are at most 65535 bytes, so the growth is split over
    several extensions of unassigned types.
    """
    records = base if base is not None else client_hello()
    assert records[0] == 0x16
    rec_len = struct.unpack("!H", records[3:5])[0]
    hs = records[5 : 5 + rec_len]
    assert hs[0] == 1
    body = bytearray(hs[4:])
    pos = 2 + 32
    pos += 1 + body[pos]  # session id
    pos += 2 + struct.unpack("!H", body[pos : pos + 2])[0]  # cipher suites
    pos += 1 + body[pos]  # compression
    ext_len = struct.unpack("!H", body[pos : pos + 2])[0]
    exts = bytes(body[pos + 2 : pos + 2 + ext_len])
    extra = b""
    need = max(0, size - len(hs))
    etype = 0xFE00
    while need > 0:
        part = min(need, 60000)
        extra += struct.pack("!HH", etype, part) + bytes(part)
        need -= part + 4
        etype += 1
    new_exts = extra + exts  # before pre_shared_key-style "must be last" extensions
    ext_field = struct.pack("!H", len(new_exts) & 0xFFFF) + new_exts  # lengths past 65535 wrap: malformed on purpose
    new_body = bytes(body[:pos]) + ext_field
    msg = bytes([1]) + struct.pack("!I", len(new_body))[1:] + new_body
    out = bytearray()
    for i in range(0, len(msg), 16384):
        chunk = msg[i : i + 16384]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return bytes(out)


# --- metrics ---------------------------------------------------------------------------------
def metric_sum(address: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` (with at least ``labels``) on ``http://ADDRESS/metrics``."""
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        base, _, rest = key.partition("{")
        if base != name:
            continue
        pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if "=" in p)
        if all(pairs.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total
