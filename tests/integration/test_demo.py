"""``tapproof demo`` (loopback): the tap relay writes a pcap the auditor reads, the story holds, cleanup is total."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tapproof.cli import demo as demo_cli
from tapproof.demo.inspect import inspect_capture, streams
from tapproof.demo.orchestrate import Demo, DemoOptions
from tapproof.demo.tap import TapRelay

pytestmark = pytest.mark.integration


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_tap_relay_forwards_and_records_every_byte_as_a_pcap(tmp_path: Path) -> None:
    srv, thread = _echo_server()
    pcap = tmp_path / "tap.pcap"
    tap = TapRelay(pcap, srv.getsockname()).start()
    payload = b"hello CANARY-0123456789abcdef " * 5000  # ~150 kB: several synthetic segments
    with socket.create_connection(tap.address, timeout=10) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
    thread.join(10)
    stats = tap.close()
    srv.close()
    assert got == payload.upper()
    assert stats.connections == 1
    assert stats.bytes == 2 * len(payload)
    data = streams(pcap)
    assert sorted(data.values(), key=len) == sorted([payload, payload.upper()], key=len)
    view = inspect_capture(pcap, "CANARY-0123456789abcdef")
    assert view.canary_seen
    assert view.flows == 1
    assert view.bytes == 2 * len(payload)
    assert view.grade == "F"  # the auditor reads the synthetic capture: plaintext


def test_tap_refuses_connections_until_it_has_an_upstream(tmp_path: Path) -> None:
    tap = TapRelay(tmp_path / "t.pcap").start()
    try:
        with socket.create_connection(tap.address, timeout=5) as c:
            c.settimeout(5)
            assert c.recv(1) == b""
    finally:
        tap.close()
    assert tap.stats.connections == 0


@pytest.mark.slow
def test_loopback_demo_shows_the_canary_then_nothing_but_pq_tls(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = Demo(DemoOptions(out=out)).run()
    assert result.failures == []
    assert result.ok
    before, after = result.runs
    assert before.capture.canary_seen
    assert before.client_got_canary
    assert not after.capture.canary_seen
    assert after.client_got_canary
    assert after.capture.groups == ["X25519MLKEM768"]
    assert after.capture.tls_versions == ["TLS 1.3"]
    assert after.capture.grade == "A"
    assert result.seconds < 60
    report = json.loads((out / "run2-tapproof.audit.json").read_text())
    assert {f["group"] for f in report["flows"]} == {"X25519MLKEM768"}
    assert (out / "run1-plaintext.pcap").stat().st_size > 24
    assert not any(out.glob("**/*.key")), "no private key may land in the out directory"


class _Interrupt:
    """A reporter that presses Ctrl-C when a given step starts."""

    def __init__(self, at: str) -> None:
        self.at = at
        self.demo: Demo | None = None
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, title: str) -> None:
        if title.startswith(self.at):
            assert self.demo is not None
            self.running = [p for s in self.demo.sites for p in s.procs]
            raise KeyboardInterrupt

    def done(self, title: str, seconds: float) -> None:
        pass

    def failed(self, title: str, seconds: float) -> None:
        pass


@pytest.mark.slow
def test_ctrl_c_mid_demo_stops_every_process_and_removes_temporary_data(tmp_path: Path) -> None:
    rep = _Interrupt("dc1: agent")
    demo = Demo(DemoOptions(out=tmp_path / "out"), rep)
    rep.demo = demo
    with pytest.raises(KeyboardInterrupt):
        demo.run()
    assert len(rep.running) >= 3  # server, service, agent dc2 were up when Ctrl-C came
    assert all(p.poll() is not None for p in rep.running)
    assert not demo.tmp.exists()
    assert all(tap._stop.is_set() for tap in demo.taps)


@pytest.mark.slow
def test_demo_cli_exits_zero_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    demo_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "canary seen by the tap" in text
    assert "X25519MLKEM768" in text
    assert "PASS" in text
