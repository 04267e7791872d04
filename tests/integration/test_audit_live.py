"""``tapproof audit live`` on loopback: tcpdump for N seconds, then the same grading (root)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, require_root, require_tool

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.tcpdump]


def _http_pair(port: int, stop: threading.Event) -> None:
    """A plaintext HTTP exchange every 0.2 s until ``stop`` (bounded: at most 50)."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(8)
        srv.settimeout(0.5)
        for _ in range(50):
            if stop.is_set():
                return
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                conn, _ = srv.accept()
                with conn:
                    c.sendall(b"GET /secret HTTP/1.1\r\nHost: db\r\n\r\n")
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                    c.recv(1024)
            time.sleep(0.2)


def test_live_capture_finds_plaintext(tmp_path: Path) -> None:
    require_root()
    require_tool("tcpdump")
    port = free_port()
    out = tmp_path / "live.json"
    stop = threading.Event()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tapproof",
            "audit",
            "live",
            "--iface",
            "lo",
            "--seconds",
            "4",
            "--filter",
            f"tcp port {port}",
            "--json",
            str(out),
            "--fail-on",
            "plaintext",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(1.5)  # let tcpdump start
    t = threading.Thread(target=_http_pair, args=(port, stop))
    t.start()
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop.set()
        t.join(10)
        if proc.poll() is None:  # a hung capture: do not leave it (and its tcpdump) behind
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 1, stderr.decode()  # --fail-on plaintext: met
    report = json.loads(out.read_text())
    flows = [f for f in report["flows"] if port in (f["sport"], f["dport"])]
    assert flows
    assert {f["protocol"] for f in flows if f["grade"] != "?"} == {"http"}
    assert all(f["grade"] in ("F", "?") for f in flows)
    assert b"coverage" in stdout


def test_live_bad_interface_is_bad_input() -> None:
    require_root()
    require_tool("tcpdump")
    res = subprocess.run(
        [sys.executable, "-m", "tapproof", "audit", "live", "--iface", "nosuchif0", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 2
    assert "nosuchif0" in res.stderr
