"""Start real ``tapproof server`` processes for tests (ephemeral ports, stopped by PID)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import free_port


def tapproof(*args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m tapproof``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "tapproof", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        stdin=subprocess.DEVNULL,
    )


@dataclasses.dataclass
class Server:
    """A running server process."""

    data_dir: Path
    proc: subprocess.Popen[bytes]
    address: str
    metrics: str
    log_path: Path

    def log(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace")

    def token(self, host: str, ttl: str = "15m") -> str:
        """Create a join string through the real CLI."""
        res = tapproof("server", "token", "create", "--data-dir", str(self.data_dir), "--host", host, "--ttl", ttl)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if needed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def init(data_dir: Path, td: str = "example.org", *extra: str) -> None:
    """``tapproof server init`` on an ephemeral port."""
    res = tapproof(
        "server", "init", "--data-dir", str(data_dir), "--trust-domain", td, "--listen", "127.0.0.1:0", *extra
    )
    assert res.returncode == 0, res.stderr


def start(data_dir: Path, *extra: str, timeout: float = 20) -> Server:
    """Start ``tapproof server run`` and wait until its address file appears."""
    run_file = data_dir / "run" / "address.json"
    with contextlib.suppress(FileNotFoundError):
        run_file.unlink()
    metrics = f"127.0.0.1:{free_port()}"
    log_path = data_dir.parent / f"{data_dir.name}-server-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tapproof",
                "server",
                "run",
                "--data-dir",
                str(data_dir),
                "--metrics",
                metrics,
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()}")
        try:
            addr = json.loads(run_file.read_text())["addresses"][0]
            return Server(data_dir, proc, addr, metrics, log_path)
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not start: {log_path.read_text()}")


@contextlib.contextmanager
def running(data_dir: Path, td: str = "example.org", *extra: str) -> Iterator[Server]:
    """Init (if needed) and run a server for the duration of a ``with`` block."""
    if not (data_dir / "server.toml").exists():
        init(data_dir, td)
    srv = start(data_dir, *extra)
    try:
        yield srv
    finally:
        srv.stop()
