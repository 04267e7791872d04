"""Certificate renewal under a continuous stream, across a control-plane outage.

Host certificates live 1 minute (the server's minimum) and are renewed at half
life. The control plane is killed a few seconds into a continuous stream, so
the first renewal (~30 s in) fails and backs off while the tunnel, and new
tunnels, keep working on the current certificate and the cached registry and
policy; the server comes back and the renewal goes through. The stream must end
with every byte back, in order, and no error.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Stream:
    """A continuous, rate-limited stream through an echo service, checked end to end."""

    def __init__(self, addr: tuple[str, int], chunk: int = 32 * 1024, interval: float = 0.01) -> None:
        self.sock = socket.create_connection(addr, timeout=30)
        self.chunk, self.interval = chunk, interval
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.n_sent = self.n_received = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._tx = threading.Thread(target=self._send, daemon=True)
        self._rx = threading.Thread(target=self._recv, daemon=True)
        self._tx.start()
        self._rx.start()

    def _send(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                data = i.to_bytes(8, "big") * (self.chunk // 8)
                self.sock.sendall(data)
                self.sent.update(data)
                self.n_sent += len(data)
                i += 1
                time.sleep(self.interval)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(exc)

    def _recv(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 16):
                self.received.update(chunk)
                self.n_received += len(chunk)
        except OSError as exc:
            self.errors.append(exc)

    def finish(self) -> None:
        """Stop sending, half-close, wait for the echo to end."""
        self._stop.set()
        self._tx.join(30)
        self._rx.join(30)
        self.sock.close()


def test_renewal_and_outage_during_a_continuous_stream(tmp_path: Path) -> None:
    echo = procs.EchoServer()
    srv = procs.start_server(tmp_path / "srv", leaf_ttl="1m")
    a = b = None
    try:
        b = procs.start_agent(tmp_path / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{echo.port}")
        a = procs.start_agent(
            tmp_path / "a", srv.token("a"), "--route", "127.0.0.1:0=echo@b", "--renew-fraction", "0.5"
        )
        procs.wait_for(lambda: "b" in a.status()["registry_hosts"], 15, "a to learn b")
        serial_a, serial_b = a.status()["certificate"]["serial"], b.status()["certificate"]["serial"]
        stream = Stream(a.route())
        time.sleep(2)

        srv.kill()
        procs.wait_for(lambda: a.metric("tapproof_agent_control_plane_up") == 0, 10, "a to see the outage")
        procs.wait_for(lambda: a.events("control-plane-down"), 10, "the control-plane-down line")  # after the gauge
        # new tunnels work during the outage (cached registry, policy and revocations)
        sent, received, _ = procs.echo_roundtrip(a.route(), 1 << 20)
        assert sent == received
        code, _body = a.admin_get("/healthz")
        assert code == 200

        # the renewal falls due (~30 s after issuance) and fails while the server is down
        procs.wait_for(lambda: a.events("renewal-failed"), 45, "a failed renewal during the outage", step=0.5)
        assert a.status()["certificate"]["serial"] == serial_a  # the current certificate keeps serving
        assert a.metric("tapproof_agent_renewals_total", result="failure") >= 1

        srv.restart()
        procs.wait_for(
            lambda: a.status()["certificate"]["serial"] != serial_a, 20, "a's renewal after the restart", step=0.5
        )
        procs.wait_for(
            lambda: b.status()["certificate"]["serial"] != serial_b, 20, "b's renewal after the restart", step=0.5
        )
        assert a.metric("tapproof_agent_renewals_total", result="success") >= 1
        procs.wait_for(lambda: a.metric("tapproof_agent_control_plane_up") == 1, 20, "the control plane up")
        # new tunnels use the renewed certificates
        sent, received, _ = procs.echo_roundtrip(a.route(), 1 << 20)
        assert sent == received

        stream.finish()
        assert not stream.errors, stream.errors
        assert stream.n_sent > 10 << 20
        assert stream.n_received == stream.n_sent
        assert stream.received.hexdigest() == stream.sent.hexdigest()
        assert a.stop() == 0
        assert b.stop() == 0
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()
        srv.stop()
        echo.close()
