"""Fault: ``kill -9`` of an agent in the middle of a 1 GiB transfer, then a restart.

Loopback is enough here: the tunnel port is the wire, captured and audited.
The client agent ``a`` dies ~256 MiB into a 1 GiB echo transfer; the service
behind agent ``b`` (the peer application) must see an error (an RST from
``b``'s relay, which read a TLS EOF without close_notify), never an orderly
EOF after a short read; the client sees an error too. While ``a`` is down
its route port refuses; after the restart, a new tunnel works within 5 s of
the agent being ready. Nothing but post-quantum TLS 1.3 on the tunnel and API
ports, before, during and after.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.battery.invariants import HashEcho, check_transfer, checked, stream
from tests.helpers import require_root, require_tool
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.tcpdump, pytest.mark.root]

GIB = 1 << 30
KILL_AT = 256 << 20


def _metrics(agent: procs.AgentProc) -> str:
    return f"http://{agent.addresses['admin']}/metrics"


def test_kill9_agent_mid_transfer_then_restart(tmp_path: Path) -> None:
    require_root()
    require_tool("tcpdump")
    echo = HashEcho()
    srv = procs.start_server(tmp_path / "srv")
    a = b = None
    try:
        b = procs.start_agent(tmp_path / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{echo.port}")
        a = procs.start_agent(tmp_path / "a", srv.token("a"), "--route", "127.0.0.1:0=echo@b")
        procs.wait_for(lambda: "b" in a.status()["registry_hosts"], 15, "a to learn b")
        with checked(tmp_path) as inv:
            inv.capture_lo([a.tunnel[1], b.tunnel[1], int(srv.listen.rsplit(":", 1)[1])])
            inv.watch("server", srv.proc.pid, log=srv.log_path)
            inv.watch("b", b.proc.pid, log=b.log_path, metrics=_metrics(b))
            inv.watch("a", a.proc.pid, log=a.log_path, metrics=_metrics(a))

            # a clean transfer first: both ends hold the same bytes
            assert check_transfer(stream(a.route(), 8 << 20), echo.wait_ended(1)[0], 8 << 20) == "complete"

            killed = threading.Event()
            victim = a

            def kill_midway(sent: int) -> None:
                if sent >= KILL_AT and not killed.is_set():
                    victim.proc.kill()  # SIGKILL
                    killed.set()

            t0 = time.monotonic()
            client = stream(a.route(), GIB, on_progress=kill_midway, timeout=60)
            a.proc.wait(10)
            inv.forget("a")
            service = echo.wait_ended(2)[1]
            assert killed.is_set()
            assert check_transfer(client, service) == "error"
            assert service.error is not None, "the peer application saw no error"
            assert not service.clean_eof, "the peer application saw a clean EOF"
            # the error is what counts: after the sending thread's ECONNRESET the kernel may answer the
            # receiving thread's next recv() with 0, so clean_eof alone says nothing here (see check_transfer)
            assert client.error is not None, "the client saw no error"
            assert KILL_AT <= client.sent < GIB
            assert service.received < GIB
            detect = time.monotonic() - t0

            # b aborted its half of the tunnel and logged why
            procs.wait_for(lambda: b.events("tunnel-closed"), 10, "b to log the aborted tunnel")
            ends = [e.get("end") for e in b.events("tunnel-closed")]
            assert any(e != "complete" for e in ends), ends

            # the gap: a's route is gone, an application gets a refusal, not a plaintext path
            gap = stream(a.route(), 1 << 20, timeout=5)
            assert (gap.error or "").startswith("connect"), gap.error

            t_restart = time.monotonic()
            a = procs.start_agent(tmp_path / "a", None, "--route", "127.0.0.1:0=echo@b")
            t_ready = time.monotonic()
            inv.rewatch("a", a.proc.pid, log=a.log_path, metrics=_metrics(a))

            def tunnel_ok() -> bool:
                end = stream(a.route(), 1 << 20, timeout=5)
                return end.clean_eof and end.error is None and end.received == 1 << 20

            procs.wait_for(tunnel_ok, 5, "a new tunnel after the restart", step=0.1)
            t_tunnel = time.monotonic()
            after = stream(a.route(), 32 << 20)
            assert check_transfer(after, echo.wait_ended(len(echo.ends))[-1], 32 << 20) == "complete"
            print(
                f"kill -9 at {KILL_AT >> 20} MiB: errors seen after {detect:.2f}s; "
                f"restart to ready {t_ready - t_restart:.2f}s, ready to first tunnel {t_tunnel - t_ready:.2f}s"
            )
        assert inv.protected_flows, "the capture saw no tunnel traffic"
        assert a.stop() == 0
        assert b.stop() == 0
    finally:
        for p in (a, b):
            if p is not None:
                p.stop()
        srv.stop()
        echo.close()
