"""``tapproof doctor`` against a real server and agent: healthy, server stopped, clock and expiry.

The clock cases run the doctor under ``faketime`` (libfaketime): the doctor's
clock is ahead of the server's, exactly as on a host whose time sync broke, and
the host certificate is seen near or past its expiry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tapproof.cli import main as cli_main
from tests.helpers import require_tool
from tests.integration import procs

pytestmark = [pytest.mark.integration]


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """``tapproof doctor --json ARGS`` through the real CLI, in this process; (exit code, {name: check})."""
    capsys.readouterr()
    rc = cli_main.main(["doctor", "--json", "--timeout", "15s", *args])
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is (rc == 0)
    return rc, {c["name"]: c for c in doc["checks"]}


def table(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The human table (in process)."""
    capsys.readouterr()
    rc = cli_main.main(["doctor", "--timeout", "15s", *args])
    return rc, capsys.readouterr().out


def faked_doctor(offset: str, *args: str) -> tuple[int, dict[str, Any]]:
    """``tapproof doctor --json`` in a subprocess whose clock is ``offset`` ahead (libfaketime)."""
    argv = ["faketime", "-f", offset, sys.executable, "-m", "tapproof", "doctor", "--json", "--timeout", "15s", *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert res.stdout, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] is (res.returncode == 0)
    return res.returncode, {c["name"]: c for c in doc["checks"]}


def statuses(found: dict[str, Any]) -> dict[str, str]:
    return {name: c["status"] for name, c in found.items()}


def test_healthy_host_then_stopped_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with procs.server(tmp_path / "srv") as srv:
        agent = procs.start_agent(tmp_path / "a", srv.token("a"))
        try:
            procs.wait_for(lambda: agent.admin_get("/healthz")[0] == 200, 30, "agent healthy")
            rc, found = doctor(capsys, "--data-dir", str(tmp_path / "a"), "--server-data-dir", str(srv.data_dir))
            assert rc == 0, found
            st = statuses(found)
            expected_ok = [
                "agent.identity",
                "agent.certificate",
                "agent.health",
                "agent.ports",
                "server.api",
                "server.pq",
                "clock.skew",
                "agent.bundle",
                "local-server.api",
                "local-server.pq",
                "ca.intermediate",
                "ca.root",
            ]
            assert {n: st.get(n) for n in expected_ok} == dict.fromkeys(expected_ok, "OK")
            assert st["transparent.rules"] == ("OK" if os.geteuid() == 0 else "SKIP")
            assert found["server.pq"]["details"]["group"] == "X25519MLKEM768"
            # one clock: the skew measured is no more than its uncertainty (half the round trip; a loaded
            # machine can make that seconds), and the check above says what exceeds it is under SKEW_WARN
            skew = found["clock.skew"]["details"]
            assert abs(skew["skew_seconds"]) < 5, skew
            assert abs(skew["skew_seconds"]) <= skew["uncertainty_seconds"] + 0.01, skew
            assert "same as the server" in found["agent.bundle"]["summary"]
            assert found["agent.ports"]["details"]["tunnel"] == procs_tunnel(agent)

            rc, text = table(capsys, "--data-dir", str(tmp_path / "a"))
            assert rc == 0, text
            assert "server.api" in text
            assert "X25519MLKEM768" in text
            assert "0 failure(s)" in text

            srv.stop()
            rc, found = doctor(capsys, "--data-dir", str(tmp_path / "a"))
            assert rc == 1
            api = found["server.api"]
            assert api["status"] == "FAIL"
            assert srv.address in api["summary"]
            assert "connect" in api["summary"]
            assert "start the server" in api["fix"]
            assert found["clock.skew"]["status"] == "SKIP"
            assert found["agent.health"]["status"] == "OK"  # the data plane does not need the control plane

            rc, text = table(capsys, "--data-dir", str(tmp_path / "a"))
            assert rc == 1
            assert "FAIL" in text
            assert "start the server" in text
        finally:
            agent.stop()
    # the agent is gone too: its admin endpoint does not answer
    rc, found = doctor(capsys, "--data-dir", str(tmp_path / "a"))
    assert rc == 1
    assert found["agent.health"]["status"] == "FAIL"
    assert "start the agent" in found["agent.health"]["fix"]


def procs_tunnel(agent: procs.AgentProc) -> str:
    host, port = agent.tunnel
    return f"{host}:{port}"


def test_clock_ahead_and_certificate_near_and_past_expiry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_tool("faketime")
    with procs.server(tmp_path / "srv", leaf_ttl="1m") as srv:
        res = procs.tapproof("agent", "enroll", "--data-dir", str(tmp_path / "a"), "--join", srv.token("a"))
        assert res.returncode == 0, res.stderr
        args = ("--data-dir", str(tmp_path / "a"), "--admin", "")

        rc, found = doctor(capsys, *args)
        assert rc == 0, found
        assert statuses(found)["agent.certificate"] == "OK"
        assert statuses(found)["clock.skew"] == "OK"

        # 50 s ahead: the 1-minute certificate has ~10 s left (renewal overdue), the clock is off
        rc, found = faked_doctor("+50s", *args)
        assert rc == 0, found
        assert found["agent.certificate"]["status"] == "WARN"
        assert "renewal overdue" in found["agent.certificate"]["summary"]
        skew = found["clock.skew"]
        assert skew["status"] == "WARN"
        assert "timedatectl" in skew["fix"]
        assert -55 < skew["details"]["skew_seconds"] < -45  # the server is behind us
        # exactly 50 s, to within the measurement's uncertainty (half the round trip)
        assert abs(skew["details"]["skew_seconds"] + 50) <= skew["details"]["uncertainty_seconds"] + 0.01, skew
        assert found["server.api"]["status"] == "OK"  # the server judges our certificate by its own clock

        # 3 minutes ahead: expired here, and past the skew that breaks certificates
        rc, found = faked_doctor("+3m", *args)
        assert rc == 1
        assert found["agent.certificate"]["status"] == "FAIL"
        assert "expired" in found["agent.certificate"]["summary"]
        assert found["clock.skew"]["status"] == "FAIL"
