"""The battery's invariants, checked after every fault and every bad-input test.

1. **Bytes**: per direction, what one end sent is what the other end received
   (SHA-256 and count at both ends), or the receiving application saw an
   error: never a silent truncation. :class:`HashEcho` (the service side) and
   :func:`stream` (the client side) record both ends; :func:`check_transfer`
   judges them. Closes are close_notify-safe at the application level: the
   client half-closes, then drains to EOF before closing, so no unread data
   turns the close into an RST that loses the tail.
2. **No plaintext** to a protected port: a capture of the test (``tcpdump`` on
   ``lo`` filtered by port, or inside a namespace) graded by
   ``tapproof audit pcap --json``; no flow to a protected port may be
   plaintext, and every flow there that the capture saw from its start must
   be TLS 1.3 with X25519MLKEM768 (grade A).
3. **Resources**: descriptors (``/proc/PID/fd``), threads (``/proc/PID/task``)
   and TCP connections (the process's sockets in ``/proc/PID/net/tcp{,6}``,
   listeners excluded) back to their baseline +-5 within 30 s, per process.
4. **Logs**: no traceback, no ``exc`` field, no ``critical`` line in any log;
   every refusal is one structured line with a ``reason`` and each agent's
   ``tunnel-refused`` lines match the ``tapproof_agent_refusals_total`` delta
   per (direction, reason). A watched process must still be alive unless the
   test said it stopped it (:meth:`Invariants.forget` / :meth:`Invariants.rewatch`).

Use the ``invariants`` fixture (tests/battery/conftest.py) or the context manager::

    with checked(tmp_path) as inv:
        inv.watch("agent-a", a.proc.pid, log=a.log_path, metrics=f"http://{a.addresses['admin']}/metrics")
        inv.capture_lo([a.tunnel[1], b.tunnel[1]])
        ...  # the test
    # on exit: captures audited, resources, logs and refusals checked
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.integration import procs

SLACK = 5
"""Allowed difference from a baseline count (descriptors, threads, connections)."""
SETTLE = 30.0
"""Seconds a process gets to come back to its baseline."""
SNAPLEN = 4096
"""Bytes kept per packet: the whole ClientHello/ServerHello (ML-KEM shares ~1.2 KB), not the bulk data."""

# --- 1. bytes -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class End:
    """What one end of one connection sent and received."""

    sent: int = 0
    sent_sha: Any = dataclasses.field(default_factory=hashlib.sha256)
    send_complete: bool = False  # every byte handed over and the write side shut down
    received: int = 0
    recv_sha: Any = dataclasses.field(default_factory=hashlib.sha256)
    clean_eof: bool = False  # the read side ended with an orderly EOF
    error: str | None = None

    def digest(self) -> tuple[str, str]:
        """(sha256 sent, sha256 received)."""
        return self.sent_sha.hexdigest(), self.recv_sha.hexdigest()


def _pattern(i: int, size: int) -> bytes:
    """Chunk ``i``: numbered, so reordering or duplication changes the hash."""
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def stream(
    addr: tuple[str, int],
    size: int,
    *,
    chunk: int = 1 << 20,
    timeout: float = 120.0,
    on_progress: Any = None,
    sock: socket.socket | None = None,
    interval: float = 0.0,
    stop: threading.Event | None = None,
) -> End:
    """Send ``size`` bytes to ``addr`` and read the echo back at the same time; never raises.

    The write side is half-closed after the last byte, then the read side is
    drained to EOF before the socket is closed. ``on_progress(sent)`` is
    called after each chunk (a test can kill something mid-transfer there).
    ``interval`` paces the chunks (a long, slow connection); setting ``stop``
    ends the sending early, orderly (half-close, then drain).
    """
    end = End()
    try:
        s = sock or socket.create_connection(addr, timeout=timeout)
    except OSError as exc:
        end.error = f"connect: {exc}"
        return end
    s.settimeout(timeout)
    chunks = [_pattern(i, chunk) for i in range(4)]

    def send() -> None:
        try:
            i = 0
            while end.sent < size and not (stop is not None and stop.is_set()):
                part = chunks[i % 4][: min(chunk, size - end.sent)]
                s.sendall(part)
                end.sent_sha.update(part)
                end.sent += len(part)
                i += 1
                if on_progress is not None:
                    on_progress(end.sent)
                if interval:
                    time.sleep(interval)
            s.shutdown(socket.SHUT_WR)
            end.send_complete = True
        except OSError as exc:
            end.error = end.error or f"send: {exc}"

    t = threading.Thread(target=send, name="stream-send", daemon=True)
    t.start()
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    try:
        while True:
            n = s.recv_into(view)
            if n == 0:
                end.clean_eof = True
                break
            end.recv_sha.update(view[:n])
            end.received += n
    except OSError as exc:
        end.error = end.error or f"recv: {exc}"
    t.join(timeout)
    s.close()
    return end


class HashEcho(procs.EchoServer):
    """:class:`~tests.integration.procs.EchoServer` on ``host`` that hashes what it receives and sends, per connection.

    Half-close is honoured (EOF in -> EOF out after the echo is flushed); an
    error (RST) is recorded in the connection's :class:`End`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.ends: list[End] = []
        self._lock = threading.Lock()
        super().__init__(host, port)

    def _serve(self, conn: socket.socket) -> None:
        end = End()
        with self._lock:
            self.ends.append(end)
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        with conn:
            try:
                while True:
                    n = conn.recv_into(view)
                    if n == 0:
                        end.clean_eof = True
                        conn.shutdown(socket.SHUT_WR)
                        end.send_complete = True
                        return
                    end.recv_sha.update(view[:n])
                    end.received += n
                    conn.sendall(view[:n])
                    end.sent_sha.update(view[:n])
                    end.sent += n
            except OSError as exc:
                end.error = str(exc) or type(exc).__name__

    def wait_ended(self, count: int, timeout: float = 30.0) -> list[End]:
        """The first ``count`` connections, once each has ended (EOF or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                ends = list(self.ends[:count])
            if len(ends) == count and all(e.clean_eof or e.error for e in ends):
                return ends
            time.sleep(0.05)
        raise AssertionError(f"{count} service-side connections did not end within {timeout}s")


def check_transfer(client: End, service: End, size: int | None = None) -> str:
    """Invariant 1 for one connection; return "complete" or "error" (raises on a silent truncation).

    Client -> service: if the service saw an orderly EOF, the client must
    have sent everything and the service must hold exactly those bytes.
    Service -> client: if the client saw an orderly EOF, the service must
    have finished its echo and the client must hold exactly those bytes.
    """
    # An orderly EOF counts only at an end that saw no error: after a reset reported to one call
    # (e.g. the sending thread's ECONNRESET), the kernel answers the next recv() with 0, not the error.
    if service.clean_eof and service.error is None:
        assert client.send_complete, f"silent truncation: service saw EOF after {service.received} B, client failed"
        assert (service.received, service.recv_sha.hexdigest()) == (client.sent, client.sent_sha.hexdigest()), (
            f"client->service differs without an error: {client.sent} B sent, {service.received} B received"
        )
    if client.clean_eof and client.error is None:
        assert service.send_complete, f"silent truncation: client saw EOF after {client.received} B, service failed"
        assert (client.received, client.recv_sha.hexdigest()) == (service.sent, service.sent_sha.hexdigest()), (
            f"service->client differs without an error: {service.sent} B sent, {client.received} B received"
        )
    if client.clean_eof and service.clean_eof and client.error is None and service.error is None:
        if size is not None:
            assert client.sent == size == client.received, f"{client.sent}/{client.received} of {size} B"
        return "complete"
    assert client.error or service.error, "a transfer ended short with no error at either end"
    return "error"


# --- 2. no plaintext ---------------------------------------------------------------------------------


def audit(pcap: Path, out: Path) -> dict[str, Any]:
    """``tapproof audit pcap PCAP --json OUT``; the report."""
    res = subprocess.run(
        [sys.executable, "-m", "tapproof", "audit", "pcap", str(pcap), "--json", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.exists(), f"audit wrote no report ({res.returncode}): {res.stderr[-2000:]}"
    return dict(json.loads(out.read_text()))


def check_no_plaintext(report: dict[str, Any], protected_ports: Sequence[int]) -> list[dict[str, Any]]:
    """Invariant 2: no flow to a protected port is plaintext; flows seen from their start are grade A.

    Return the flows to protected ports (a test can assert it saw the traffic it made).
    """
    ports = set(protected_ports)
    flows = [f for f in report["flows"] if f["dport"] in ports]
    plain = [f for f in flows if f["verdict"] == "plaintext" or f["grade"] == "F"]
    assert not plain, f"plaintext to a protected port: {plain[:3]}"
    weak = [
        f
        for f in flows
        if not f["midstream"] and f["bytes_c2s"] + f["bytes_s2c"] > 0 and f["grade"] != "A" and f["tls_version"]
    ]
    assert not weak, f"not TLS 1.3 + X25519MLKEM768 on a protected port: {weak[:3]}"
    return flows


# --- 3. resources ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Usage:
    """One process's descriptors, threads and TCP connections (listeners excluded)."""

    fds: int
    threads: int
    conns: int


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                out.add(link[8:-1])
    return out


def usage(pid: int) -> Usage:
    """Read ``/proc`` for ``pid`` (raises ProcessLookupError-like OSError if it is gone)."""
    inodes = _socket_inodes(pid)
    conns = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] != "0A" and cols[9] in inodes:  # 0A = LISTEN
                    conns += 1
    return Usage(len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), conns)


# --- 4. logs and metrics -------------------------------------------------------------------------------

REFUSAL_EVENTS = (
    "tunnel-refused",
    "api-refused",
    "handshake-refused",
    "peer-refused-mid-connection",
    "enroll-refused",
    "connection-refused",
    "clock-skew",
)


def log_problems(text: str, allow: Sequence[str] = ()) -> list[str]:
    """Tracebacks, logged exceptions and critical lines in a log (minus lines containing an ``allow`` string)."""
    problems = []
    for line in text.splitlines():
        if any(a in line for a in allow):
            continue
        if "Traceback (most recent call last)" in line:
            problems.append(line[:300])
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("exc") or obj.get("level") == "critical":
            problems.append(line[:600])
        elif obj.get("event") in REFUSAL_EVENTS and not obj.get("reason"):
            problems.append("refusal without a reason: " + line[:300])
    return problems


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {'name{k="v",...}': value} (labels sorted)."""
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - a test's own loopback endpoint
        body = resp.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if "{" in key:
            name, _, rest = key.partition("{")
            key = name + "{" + ",".join(sorted(p for p in rest.rstrip("}").split(",") if p)) + "}"
        out[key] = float(value)
    return out


def refusal_counts(metrics: dict[str, float]) -> dict[tuple[str, str], float]:
    """``tapproof_agent_refusals_total`` by (direction, reason)."""
    out: dict[tuple[str, str], float] = {}
    for key, value in metrics.items():
        if key.startswith("tapproof_agent_refusals_total{"):
            labels = dict(p.split("=", 1) for p in key[key.index("{") + 1 : -1].split(","))
            out[(labels["direction"].strip('"'), labels["reason"].strip('"'))] = value
    return out


# --- the fixture ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Watched:
    """A process under watch with its baselines."""

    name: str
    pid: int
    log: Path | None
    metrics: str | None
    base: Usage
    log_offset: int
    refusals: dict[tuple[str, str], float]


class Invariants:
    """Baselines at :meth:`watch`, captures at :meth:`capture_lo`/:meth:`capture_in`; :meth:`check` at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = Path(tmp)
        self.watched: dict[str, Watched] = {}
        self.logs: list[tuple[Path, int]] = []  # logs of processes no longer watched (killed): still scanned
        self.captures: list[tuple[Any, tuple[int, ...]]] = []
        self.allow_log: list[str] = []
        self.unlogged_refusals: set[str] = set()
        self.reports: list[dict[str, Any]] = []
        self.protected_flows: list[dict[str, Any]] = []

    def watch(self, name: str, pid: int, *, log: Path | None = None, metrics: str | None = None) -> None:
        """Take ``pid``'s baseline now (the process should be idle); ``metrics`` is its /metrics URL."""
        offset = log.stat().st_size if log is not None and log.exists() else 0
        refusals = refusal_counts(scrape(metrics)) if metrics else {}
        self.watched[name] = Watched(name, pid, log, metrics, usage(pid), offset, refusals)

    def forget(self, name: str) -> None:
        """The test stopped or killed ``name`` on purpose: keep scanning its log, drop the rest."""
        w = self.watched.pop(name)
        if w.log is not None:
            self.logs.append((w.log, w.log_offset))

    def rewatch(self, name: str, pid: int, *, log: Path | None = None, metrics: str | None = None) -> None:
        """``name`` was restarted: new baseline, the old log range is still scanned."""
        if name in self.watched:
            self.forget(name)
        self.watch(name, pid, log=log, metrics=metrics)

    def capture_lo(self, ports: Sequence[int], name: str = "lo") -> None:
        """tcpdump on ``lo`` for TCP to/from ``ports`` (the protected ports)."""
        from tapproof.testing.netns import Capture

        path = self.tmp / f"{name}.pcap"
        bpf = "tcp and (" + " or ".join(f"port {p}" for p in ports) + ")"
        argv = ["tcpdump", "-i", "lo", "-n", "-s", str(SNAPLEN), "--immediate-mode", "-U", "-w", str(path), bpf]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        deadline = time.monotonic() + 10
        seen = b""
        os.set_blocking(proc.stderr.fileno(), False)
        while b"listening on" not in seen:
            assert proc.poll() is None, f"tcpdump exited: {seen!r}"
            assert time.monotonic() < deadline, f"tcpdump did not start: {seen!r}"
            with contextlib.suppress(BlockingIOError, TypeError):
                seen += os.read(proc.stderr.fileno(), 4096)
            time.sleep(0.02)
        self.captures.append((Capture(path, proc), tuple(ports)))

    def capture_in(self, host: Any, ports: Sequence[int], name: str) -> None:
        """tcpdump in a namespace (``tapproof.testing.netns.Host``) on its link, for ``ports``."""
        bpf = "tcp and ( " + " or ".join(f"port {p}" for p in ports) + " )"
        self.captures.append((host.capture(self.tmp / f"{name}.pcap", bpf=bpf), tuple(ports)))

    # --- checks -------------------------------------------------------------------------------------
    def check_plaintext(self) -> None:
        """Invariant 2 over every capture (stops them)."""
        for cap, ports in self.captures:
            pcap = cap.stop()
            report = audit(pcap, pcap.with_suffix(".json"))
            self.reports.append(report)
            self.protected_flows.extend(check_no_plaintext(report, ports))
        self.captures = []

    def check_resources(self, settle: float = SETTLE, slack: int = SLACK) -> dict[str, Usage]:
        """Invariant 3: every watched process back to baseline +-slack within ``settle`` seconds."""
        deadline = time.monotonic() + settle
        last: dict[str, Usage] = {}
        while True:
            bad = []
            for w in self.watched.values():
                try:
                    now = usage(w.pid)
                except OSError:
                    raise AssertionError(f"{w.name} (pid {w.pid}) is gone: crashed?") from None
                last[w.name] = now
                if (
                    abs(now.fds - w.base.fds) > slack
                    or abs(now.threads - w.base.threads) > slack
                    or abs(now.conns - w.base.conns) > slack
                ):
                    bad.append(f"{w.name}: {now} vs baseline {w.base}")
            if not bad:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"not back to baseline within {settle}s: {bad}")
            time.sleep(0.25)

    def check_logs(self) -> None:
        """Invariant 4: no traceback or crash line; refusals have a reason and match the metric."""
        problems = []
        for path, offset in [*self.logs, *((w.log, w.log_offset) for w in self.watched.values() if w.log)]:
            assert path is not None
            text = path.read_text(errors="replace")[offset:]
            problems += [f"{path.name}: {p}" for p in log_problems(text, self.allow_log)]
        assert not problems, "\n".join(problems[:20])
        for w in self.watched.values():
            if w.metrics is None or w.log is None:
                continue
            lines: dict[tuple[str, str], float] = {}
            for line in w.log.read_text(errors="replace")[w.log_offset :].splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    obj = json.loads(line)
                    if obj.get("event") == "tunnel-refused":
                        k = (str(obj.get("direction")), str(obj.get("reason")))
                        lines[k] = lines.get(k, 0) + 1
            now = refusal_counts(scrape(w.metrics))
            counted = {k: v - w.refusals.get(k, 0) for k, v in now.items() if v - w.refusals.get(k, 0)}
            for k, n in lines.items():
                assert counted.get(k, 0) >= n, f"{w.name}: {n} refusal lines {k} but metric delta {counted.get(k)}"
            unlogged = {k: v for k, v in counted.items() if v > lines.get(k, 0) and k[1] not in self.unlogged_refusals}
            assert not unlogged, f"{w.name}: refusals counted without a log line: {unlogged}"

    def check(self) -> None:
        """All four (bytes are checked by the test with :func:`check_transfer`)."""
        self.check_plaintext()
        self.check_resources()
        self.check_logs()

    def close(self) -> None:
        """Stop captures still running (after a failure)."""
        for cap, _ports in self.captures:
            with contextlib.suppress(Exception):
                cap.proc.send_signal(signal.SIGINT)
                cap.stop(settle=0)
        self.captures = []


@contextlib.contextmanager
def checked(tmp: Path) -> Iterator[Invariants]:
    """An :class:`Invariants` that is checked when the block ends without an exception."""
    inv = Invariants(tmp)
    try:
        yield inv
        inv.check()
    finally:
        inv.close()
