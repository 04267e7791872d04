"""Starting and always stopping the benchmark's processes (by PID), and the load clients.

Every process the harness starts goes through :class:`Procs`, which stops them
in reverse order by PID (SIGTERM, then SIGKILL) at the end of a setup, on an
error or on Ctrl-C. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from bench.peers import procstat

ROOT = Path(__file__).resolve().parents[2]


class BenchError(RuntimeError):
    """A setup could not start or a measurement failed; the message says which and why."""


class Procs:
    """The processes of one scope (a setup, or the harness itself), stopped by PID in reverse order."""

    def __init__(self) -> None:
        self.items: list[subprocess.Popen[Any]] = []

    def add(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        """Track ``proc`` (started elsewhere)."""
        self.items.append(proc)
        return proc

    def spawn(self, argv: list[str], log: Path | None = None, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` with stdout+stderr to ``log`` (or pipes if ``log`` is None)."""
        if log is not None:
            with log.open("ab") as f:
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        else:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        return self.add(proc)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every live process (newest first), wait up to ``grace`` s, then SIGKILL."""
        live = [p for p in reversed(self.items) if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        for p in self.items:
            for stream in (p.stdout, p.stderr, p.stdin):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self.items.clear()


def wait_listening(port: int, proc: subprocess.Popen[Any] | None, what: str, timeout: float = 20) -> None:
    """Wait until ``port`` listens (from /proc/net/tcp; no connection is made)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procstat.listening(port):
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before listening on {port}")
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {port} within {timeout:.0f}s")


def readline(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a pipe, or b'' after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        ch = os.read(fd, 1)
        if not ch:
            break
        buf += ch
        if ch == b"\n":
            break
    return buf


def load_argv(*args: str) -> list[str]:
    """argv of the load tool (``bench.peers.load``) in this interpreter."""
    return [sys.executable, "-m", "bench.peers.load", *args]


def run_load(args: list[str], timeout: float) -> dict[str, Any]:
    """Run one load client to completion; its JSON result."""
    try:
        res = subprocess.run(
            load_argv(*args), capture_output=True, timeout=timeout, check=False, cwd=ROOT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"load {args[0]} did not finish within {timeout:.0f}s") from exc
    if res.returncode != 0:
        tail = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise BenchError(f"load {args[0]} failed: {tail[0]}")
    out: dict[str, Any] = json.loads(res.stdout.decode().strip().splitlines()[-1])
    return out


def start_echo(procs: Procs) -> int:
    """Start an echo backend; its port."""
    proc = procs.spawn(load_argv("echo"), cwd=ROOT)
    assert proc.stdout is not None
    line = readline(proc.stdout, 15)
    if not line:
        raise BenchError("the echo backend did not start")
    return int(json.loads(line)["port"])
