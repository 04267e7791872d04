"""Fixtures for the netns tier: a two-host lab (root, ``ip``), removed even when a test fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapproof.testing.netns import Host, Lab, remove_stale
from tests.helpers import require_root, require_tool

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lab() -> Iterator[Lab]:
    """Two namespaces joined by a veth: hosts[0] = 10.77.0.1, hosts[1] = 10.77.0.2."""
    require_root()
    require_tool("ip")
    remove_stale()
    with Lab(2) as lab:
        yield lab


def probe_argv(*args: str) -> list[str]:
    """``python -m tests.netns.probe ARGS`` (run inside a namespace with cwd = the repo)."""
    return [sys.executable, "-m", "tests.netns.probe", *args]


def probe(host: Host, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the probe to completion in ``host``."""
    return host.run(["env", "-C", str(REPO), *probe_argv(*args)], timeout=timeout, check=False)


def start_listener(host: Host, addr: str, port: int, out: Path) -> subprocess.Popen[bytes]:
    """Start a one-shot listener in ``host`` and wait (bounded) until it listens."""
    proc = host.popen(["env", "-C", str(REPO), *probe_argv("listen", addr, str(port), str(out))])
    deadline = time.monotonic() + 10
    while not Path(f"{out}.ready").exists():
        assert proc.poll() is None, "listener died"
        assert time.monotonic() < deadline, "listener not ready"
        time.sleep(0.02)
    return proc


def listener_result(proc: subprocess.Popen[bytes], out: Path) -> dict[str, object]:
    """Wait for the listener to finish and return what it saw."""
    proc.wait(15)
    return dict(json.loads(out.read_text()))
