"""Network namespaces for tests and the root demo: hosts, veth links, captures, guaranteed cleanup.

A :class:`Lab` makes N namespaces ("hosts") joined by veth pairs:

* two hosts: one veth pair, ``eth0`` in each, ``10.77.0.1/24`` and ``10.77.0.2/24``;
* three or more: a switch namespace holding a bridge, and one veth pair per
  host (``eth0`` in the host, ``pN`` on the bridge), hosts ``10.77.0.1..N``.

Addresses live only inside the namespaces the lab made, so the same subnet
in two labs never collides and nothing is ever routed to a real network.
Namespace names are unique per process and lab (``tp<pid>x<lab>-<i>``);
veths are created directly inside their namespaces, so interface names
never clash in the root namespace either.

Everything the lab starts (processes in namespaces, tcpdump) is tracked by
PID and stopped on :meth:`Lab.close`, which also deletes the namespaces.
``close`` runs from ``__exit__``, from an ``atexit`` hook, and is safe to call
twice; :func:`remove_stale` deletes namespaces left by a dead process.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tapproof.errors import TapproofError

__all__ = ["Capture", "Host", "Lab", "NetnsError", "remove_stale"]

SUBNET = "10.77.0"
PREFIX = "tp"
_counter = itertools.count()
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)x\d+-(?:\d+|sw)$")


class NetnsError(TapproofError):
    """A namespace, link or capture could not be set up."""


def _run(argv: Sequence[str], *, timeout: float = 15.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], *, grace: float = 5.0) -> int | None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; return the exit code (None if it never ended)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
    return proc.poll()


@dataclass(slots=True)
class Capture:
    """A running ``tcpdump -w`` in a namespace; :meth:`stop` flushes and returns the file."""

    path: Path
    proc: subprocess.Popen[bytes]

    def stop(self, *, settle: float = 0.3) -> Path:
        """Let in-flight packets arrive, stop tcpdump (SIGINT flushes), return the capture path."""
        if self.proc.poll() is None:
            time.sleep(settle)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, grace=1.0)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.path


@dataclass(slots=True)
class Host:
    """One namespace with its address on the lab link."""

    lab: Lab
    name: str  # namespace name
    index: int  # 1-based
    address: str
    iface: str = "eth0"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace and wait for it (bounded by ``timeout``)."""
        return _run(self.exec_argv(argv), timeout=timeout, check=check)

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a process in the namespace; the lab stops it on close.

        ``log`` sends stdout and stderr to that file (overrides ``stdout``/``stderr``).
        ``ip netns exec`` execs the command, so the PID is the command's own.
        """
        full_env = dict(os.environ if env is None else env)
        if log is not None:
            with log.open("ab") as fh:
                proc = subprocess.Popen(self.exec_argv(argv), stdout=fh, stderr=subprocess.STDOUT, env=full_env)
        else:
            proc = subprocess.Popen(self.exec_argv(argv), stdout=stdout, stderr=stderr, env=full_env)
        self.lab.procs.append(proc)
        return proc

    def capture(self, path: Path, *, iface: str | None = None, bpf: str = "tcp", timeout: float = 10.0) -> Capture:
        """Start ``tcpdump -U -w path`` on this host's link; return once it is listening."""
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "tcpdump",
            "-i",
            iface or self.iface,
            "-n",
            "-s",
            "0",
            "--immediate-mode",
            "-U",
            "-w",
            str(path),
            *bpf.split(),
        ]
        proc = subprocess.Popen(self.exec_argv(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lab.procs.append(proc)
        assert proc.stderr is not None  # noqa: S101 - set by PIPE above
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        seen = b""
        try:
            while b"listening on" not in seen:
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    stop_process(proc, grace=1.0)
                    raise NetnsError(f"tcpdump in {self.name} did not start: {seen.decode(errors='replace')}")
                if sel.select(min(left, 0.5)):
                    chunk = os.read(proc.stderr.fileno(), 4096)
                    if not chunk:
                        continue
                    seen += chunk
        finally:
            sel.close()
        return Capture(path, proc)


@dataclass(slots=True)
class Lab:
    """N network namespaces joined by veths; use as a context manager."""

    hosts_wanted: int = 2
    hosts: list[Host] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    _closed: bool = False

    def __enter__(self) -> Lab:
        """Create the namespaces and links (removing what was made if that fails)."""
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop everything and delete the namespaces."""
        self.close()

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        if self.hosts_wanted < 2 or self.hosts_wanted > 200:
            raise NetnsError("a lab has 2 to 200 hosts")
        base = f"{PREFIX}{os.getpid()}x{next(_counter)}"
        for i in range(1, self.hosts_wanted + 1):
            name = f"{base}-{i}"
            self._add_ns(name)
            self.hosts.append(Host(self, name, i, f"{SUBNET}.{i}"))
        if self.hosts_wanted == 2:
            a, b = self.hosts
            _run(
                ["ip", "link", "add", "eth0", "netns", a.name, "type", "veth", "peer", "name", "eth0", "netns", b.name]
            )
        else:
            sw = f"{base}-sw"
            self._add_ns(sw)
            _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", sw, "link", "set", "br0", "up"])
            for h in self.hosts:
                port = f"p{h.index}"
                _run(["ip", "link", "add", "eth0", "netns", h.name, "type", "veth", "peer", "name", port, "netns", sw])
                _run(["ip", "-n", sw, "link", "set", port, "master", "br0"])
                _run(["ip", "-n", sw, "link", "set", port, "up"])
        for h in self.hosts:
            _run(["ip", "-n", h.name, "addr", "add", f"{h.address}/24", "dev", "eth0"])
            _run(["ip", "-n", h.name, "link", "set", "eth0", "up"])
        # Bounded wait for the links to be usable (no DAD for IPv4, but the carrier comes up asynchronously).
        deadline = time.monotonic() + 5.0
        for h in self.hosts:
            while "LOWER_UP" not in _run(["ip", "-n", h.name, "link", "show", "eth0"]).stdout:
                if time.monotonic() > deadline:
                    raise NetnsError(f"eth0 in {h.name} has no carrier")
                time.sleep(0.02)

    def close(self) -> None:
        """Stop the lab's processes (by PID), then delete its namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for proc in reversed(self.procs):
            stop_process(proc, grace=3.0)
        for name in reversed(self.namespaces):
            _delete_ns(name)


def _delete_ns(name: str) -> None:
    """Kill whatever still runs in ``name`` (it can only be ours), then delete it."""
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "del", name], check=False)


def remove_stale() -> list[str]:
    """Delete ``tp<pid>x...`` namespaces whose creating process is gone; return their names."""
    removed = []
    out = _run(["ip", "netns", "list"], check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NAME_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        _delete_ns(name)
        removed.append(name)
    return removed
