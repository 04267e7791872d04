"""Real ``tapproof server`` / ``tapproof agent run`` processes and tiny TCP services for tests.

Everything binds 127.0.0.1 with ephemeral ports and is stopped by PID. Reusable
by other test modules and the demo::

    with procs.server(tmp / "srv") as srv:
        a = procs.start_agent(tmp / "a", srv.token("a"), "--route", "127.0.0.1:0=echo@b")
        b = procs.start_agent(tmp / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{port}")
        ...
        a.stop(); b.stop()
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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tapproof.control import config as server_config
from tapproof.control.client import tls_alert
from tapproof.errors import PeerReason, PeerRejected, TapproofError, TransportError
from tapproof.units import format_duration
from tests.helpers import free_port


def tapproof(
    *args: str, timeout: float = 60, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI and capture its output (stdin: ``input``, or nothing)."""
    return subprocess.run(
        [sys.executable, "-m", "tapproof", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=input,
        env=env,
        **({} if input is not None else {"stdin": subprocess.DEVNULL}),
    )


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tapproof", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a process log."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


def wait_for(cond: Any, timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``cond()`` until truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


_DROPPED = ("Unexpected EOF", "ECONNRESET", "EPIPE", "ETIMEDOUT")
T = TypeVar("T")


def unanswered(exc: BaseException) -> bool:
    """Whether a control-plane call failed with no answer at all: connect, handshake or read timed out
    or the connection dropped (e.g. a loaded machine missed the server's 5 s handshake deadline).
    A refusal is an answer and is False here: an HTTP error status, a TLS alert, a certificate check."""
    if tls_alert(exc):
        return False
    if isinstance(exc, TransportError):
        return True
    return (
        isinstance(exc, PeerRejected)
        and exc.reason is PeerReason.HANDSHAKE_FAILED
        and any(s in str(exc) for s in _DROPPED)
    )


def retry_unanswered(fn: Callable[[], T], failures: list[str], attempts: int = 3) -> T:
    """``fn()``, called again (``attempts`` calls at most) while it fails with no answer (:func:`unanswered`).

    Each failure retried is appended to ``failures`` (thread-safe), so that the test can bound what a
    lost answer may have added on the server (the request may have been served). Use only for calls
    that are safe to repeat, such as an enrollment with the same pending key.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except TapproofError as exc:
            if attempt == attempts or not unanswered(exc):
                raise
            failures.append(repr(exc))
            time.sleep(0.5 * attempt)
    raise AssertionError("not reached")


# --- control plane -----------------------------------------------------------------------
@dataclasses.dataclass
class ServerProc:
    """A running ``tapproof server run``."""

    data_dir: Path
    listen: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics: str = ""  # the Prometheus address, 127.0.0.1:PORT

    @property
    def address(self) -> str:
        """The API address (what join strings carry)."""
        return self.listen

    def log(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace")

    def admin(self, *args: str) -> str:
        """Run an admin command against this server (``server ARGS --data-dir D``); return stdout."""
        res = tapproof("server", *args, "--data-dir", str(self.data_dir))
        assert res.returncode == 0, f"server {' '.join(args)}: {res.stderr}"
        return res.stdout

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` on the server's /metrics matching ``labels`` (0 if none)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(
            float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def token(self, host: str, ttl: str = "15m") -> str:
        """One join string for ``host``."""
        return self.admin("token", "create", "--host", host, "--ttl", ttl).strip()

    def stop(self) -> int:
        """SIGTERM (then SIGKILL)."""
        return _stop(self.proc)

    def kill(self) -> None:
        """SIGKILL: the control plane dies without a goodbye."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Start again on the same address and data dir."""
        self.proc = _start_server_proc(self.data_dir, self.listen, self.log_path, self.metrics)


def _start_server_proc(
    data_dir: Path, listen: str, log_path: Path, metrics: str, timeout: float = 30
) -> subprocess.Popen[bytes]:
    run_file = data_dir / "run" / "address.json"
    with contextlib.suppress(FileNotFoundError):
        run_file.unlink()
    argv = ["server", "run", "--data-dir", str(data_dir), "--listen", listen, "--metrics", metrics]
    deadline = time.monotonic() + timeout
    while True:
        proc = _spawn(argv, log_path)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if run_file.exists():
                return proc
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            raise RuntimeError(f"server did not start: {log_path.read_text()}")
        if time.monotonic() > deadline:  # exited (e.g. port still busy) and out of time
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()}")
        time.sleep(0.3)  # retry: the address may still be held by the killed process


def init_server(
    data_dir: Path, td: str = "example.org", leaf_ttl: str = "1h", db: str | None = None, extra: tuple[str, ...] = ()
) -> str:
    """``tapproof server init`` with a fixed free port (so a restart reuses it); return the listen address.

    ``extra``: more ``server init`` flags (e.g. ``("--intermediate-ttl", "1m")``).
    """
    listen = f"127.0.0.1:{free_port()}"
    res = tapproof(
        "server", "init", "--data-dir", str(data_dir), "--trust-domain", td, "--listen", listen, "--leaf-ttl", leaf_ttl,
        *(["--db", db] if db else []), *extra,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return listen


def start_server(
    data_dir: Path, td: str = "example.org", leaf_ttl: str = "1h", db: str | None = None, extra: tuple[str, ...] = ()
) -> ServerProc:
    """Init and run a server on 127.0.0.1 (``db``: a ``postgresql://`` URL instead of SQLite in the data dir;
    ``extra``: more ``server init`` flags)."""
    listen = init_server(data_dir, td, leaf_ttl, db, extra)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    metrics = f"127.0.0.1:{free_port()}"
    return ServerProc(data_dir, listen, _start_server_proc(data_dir, listen, log_path, metrics), log_path, metrics)


def run_server(data_dir: Path) -> ServerProc:
    """Run an already initialised data dir on the listen address its ``server.toml`` names."""
    listen = server_config.load(data_dir).listen
    log_path = data_dir.parent / f"{data_dir.name}.log"
    metrics = f"127.0.0.1:{free_port()}"
    return ServerProc(data_dir, listen, _start_server_proc(data_dir, listen, log_path, metrics), log_path, metrics)


def init_peer_server(first: Path, data_dir: Path, listen: str | None = None) -> str:
    """Set up another server for the same database and trust domain as the one in ``first``; return its listen address.

    The ONE place tests make a second server: ``server init --join-cluster`` (its own
    name and intermediate key, same database URL, leaf lifetime and trust domain), then
    ``server ca sign-intermediate`` with the root key in ``first``.
    """
    cfg = server_config.load(first)
    listen = listen or f"127.0.0.1:{free_port()}"
    res = tapproof(
        "server", "init", "--data-dir", str(data_dir), "--trust-domain", cfg.trust_domain, "--db", cfg.db,
        "--listen", listen, "--leaf-ttl", format_duration(cfg.leaf_ttl), "--name", data_dir.name, "--join-cluster",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = tapproof("server", "ca", "sign-intermediate", "--data-dir", str(first))
    assert res.returncode == 0, res.stderr
    return listen


def start_peer_server(first: ServerProc, data_dir: Path) -> ServerProc:
    """Run a second server on ``first``'s database (see :func:`init_peer_server`)."""
    listen = init_peer_server(first.data_dir, data_dir)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    metrics = f"127.0.0.1:{free_port()}"
    return ServerProc(data_dir, listen, _start_server_proc(data_dir, listen, log_path, metrics), log_path, metrics)


@contextlib.contextmanager
def server(data_dir: Path, td: str = "example.org", leaf_ttl: str = "1h") -> Iterator[ServerProc]:
    """A server for the duration of a ``with`` block."""
    srv = start_server(data_dir, td, leaf_ttl)
    try:
        yield srv
    finally:
        srv.stop()


# --- agents --------------------------------------------------------------------------------
@dataclasses.dataclass
class AgentProc:
    """A running ``tapproof agent run``."""

    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    addresses: dict[str, Any]

    @property
    def tunnel(self) -> tuple[str, int]:
        """The tunnel port's address."""
        host, port = self.addresses["tunnel"].rsplit(":", 1)
        return host, int(port)

    def route(self, index: int = 0) -> tuple[str, int]:
        """The bound address of the ``index``-th route."""
        host, port = self.addresses["route_list"][index]["address"].rsplit(":", 1)
        return host, int(port)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Log events (optionally only those called ``name``)."""
        evs = read_events(self.log_path)
        return [e for e in evs if name is None or e.get("event") == name]

    def admin_get(self, path: str) -> tuple[int, str]:
        """GET on the admin endpoint."""
        url = f"http://{self.addresses['admin']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def status(self) -> dict[str, Any]:
        """``/status`` as JSON."""
        code, body = self.admin_get("/status")
        assert code == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample from ``/metrics`` (0 if absent)."""
        _code, body = self.admin_get("/metrics")
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in body.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if _normalise(key) == want:
                return float(value)
        return 0.0

    def signal(self, sig: int) -> None:
        """Send a signal."""
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (then SIGKILL); the exit code."""
        return _stop(self.proc, timeout)


def _normalise(key: str) -> str:
    if "{" not in key:
        return key
    name, _, rest = key.partition("{")
    pairs = sorted(p for p in rest.rstrip("}").split(",") if p)
    return name + "{" + ",".join(pairs) + "}"


def start_agent(data_dir: Path, join: str | None, *extra: str, timeout: float = 30) -> AgentProc:
    """Start ``tapproof agent run`` on ephemeral ports and wait for its address file."""
    run_file = data_dir / "run" / "address.json"
    with contextlib.suppress(FileNotFoundError):
        run_file.unlink()
    log_path = data_dir.parent / f"{data_dir.name}.log"
    argv = [
        "agent",
        "run",
        "--data-dir",
        str(data_dir),
        "--listen-tunnel",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--sync-interval",
        "1s",
        *(["--join", join] if join else []),
        *extra,
    ]
    proc = _spawn(argv, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}: {log_path.read_text()}")
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(run_file.read_text())
            if data.get("pid") == proc.pid:
                return AgentProc(data_dir, proc, log_path, data)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"agent did not start: {log_path.read_text()}")


# --- tiny services -------------------------------------------------------------------------
class EchoServer:
    """A threaded TCP echo service (127.0.0.1 by default) that honours half-close (EOF in -> EOF out).

    Each accepted connection is served by :meth:`_serve` in its own thread; a subclass overrides it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.create_server((host, port))
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            try:
                while True:
                    n = conn.recv_into(view)
                    if n == 0:
                        conn.shutdown(socket.SHUT_WR)
                        return
                    conn.sendall(view[:n])
            except OSError:
                return

    def close(self) -> None:
        """Stop accepting."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def echo_roundtrip(addr: tuple[str, int], size: int, timeout: float = 120) -> tuple[str, str, int]:
    """Send ``size`` random-ish bytes, half-close, read the echo to EOF: (sha sent, sha received, n received)."""
    sent_hash = hashlib.sha256()
    recv_hash = hashlib.sha256()
    received = 0
    chunk = os.urandom(1 << 20)
    with socket.create_connection(addr, timeout=timeout) as s:
        s.settimeout(timeout)

        def send() -> None:
            left = size
            i = 0
            while left:
                part = chunk[: min(left, len(chunk))]
                # vary the data so a reordering would show
                part = i.to_bytes(4, "big") + part[4:] if len(part) > 4 else part
                sent_hash.update(part)
                s.sendall(part)
                left -= len(part)
                i += 1
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            n = s.recv_into(view)
            if n == 0:
                break
            recv_hash.update(view[:n])
            received += n
        t.join(timeout)
    return sent_hash.hexdigest(), recv_hash.hexdigest(), received


def ends_without_data(addr: tuple[str, int], *, reset_only: bool = False) -> bool:
    """Connect, send a line, expect the connection to end without one byte back.

    A reset counts wherever it lands: the agent may refuse (RST) before ``connect()`` has even
    returned on a busy machine, or before the line is written. A clean EOF counts unless
    ``reset_only``; any byte back is a failure.
    """
    try:
        with socket.create_connection(addr, timeout=15) as s:
            s.sendall(b"hello\n")
            data = s.recv(100)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return data == b"" and not reset_only


# --- two agents ------------------------------------------------------------------------------
def refused(agent: AgentProc, reason: str, timeout: float = 10) -> dict[str, Any]:
    """Wait for ``agent``'s ``tunnel-refused`` line with ``reason``; also require its refusal metric."""
    ev = wait_for(
        lambda: next((e for e in agent.events("tunnel-refused") if e.get("reason") == reason), None),
        timeout,
        f"a tunnel-refused line with reason {reason}",
    )
    assert agent.metric("tapproof_agent_refusals_total", direction=str(ev["direction"]), reason=reason) >= 1
    return ev  # type: ignore[no-any-return]


class AgentPair:
    """A server, agent ``b`` fronting an :class:`EchoServer` as ``echo`` and ``echo2`` (plus ``b_services``),
    agent ``a`` (with ``a_args``) holding one route per name in ``routes`` to ``name@b``, in that order."""

    def __init__(
        self, tmp: Path, routes: Sequence[str], a_args: Sequence[str] = (), b_services: Sequence[str] = ()
    ) -> None:
        self.tmp = tmp
        self.routes = tuple(routes)
        self.b_services = tuple(b_services)
        self.echo = EchoServer()
        self.srv = start_server(tmp / "srv")
        self.b = self.start_b()
        route_args = [x for name in self.routes for x in ("--route", f"127.0.0.1:0={name}@b")]
        self.a = start_agent(tmp / "a", self.srv.token("a"), *a_args, *route_args)
        wait_for(lambda: "b" in self.a.status()["registry_hosts"], 15, "a to learn b's address")

    def start_b(self, join: bool = True) -> AgentProc:
        """Start agent ``b`` (enrolling when ``join``, else from its data directory)."""
        svc = [f"echo=127.0.0.1:{self.echo.port}", f"echo2=127.0.0.1:{self.echo.port}", *self.b_services]
        return start_agent(
            self.tmp / "b", self.srv.token("b") if join else None, *(x for s in svc for x in ("--service", s))
        )

    def route(self, name: str) -> tuple[str, int]:
        """Agent a's listening address for ``name@b``."""
        return self.a.route(self.routes.index(name))

    def close(self) -> None:
        """Stop both agents, the server and the echo service."""
        for agent in (self.a, self.b):
            agent.stop()
        self.srv.stop()
        self.echo.close()
