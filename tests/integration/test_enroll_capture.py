"""Capture a real enrollment on loopback: the ServerHello key_share group is X25519MLKEM768 (0x11EC).

Cross-checked with tshark's TLS dissector; also checks that the join secret
never appears on the wire.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tapproof.agent.enroll import enroll
from tapproof.control.joinstring import parse
from tapproof.units import parse_hostport
from tests.helpers import require_root, require_tool
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.tcpdump]


def test_enrollment_negotiates_x25519mlkem768(tmp_path: Path) -> None:
    require_root()
    require_tool("tcpdump", "tshark")
    with procs.server(tmp_path / "srv") as srv:
        _, port = parse_hostport(srv.address)
        join = srv.token("captured")  # before the capture: it holds the enrollment alone
        pcap = tmp_path / "enroll.pcap"
        dump = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-U", "-s", "0", "-w", str(pcap), f"tcp port {port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert dump.stderr is not None
            ready = dump.stderr.readline().decode()  # "listening on lo, ..." once the capture is live
            assert "listening on" in ready, ready
            time.sleep(0.5)
            enroll(tmp_path / "agent", join)
            time.sleep(0.5)
        finally:
            dump.send_signal(signal.SIGINT)
            dump.wait(10)
            if dump.stderr is not None:
                dump.stderr.close()
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-d",
            f"tcp.port=={port},tls",
            "-Y",
            "tls.handshake.type == 2",
            "-T",
            "fields",
            "-e",
            "tls.handshake.extensions_key_share_group",
            "-e",
            "tls.handshake.extensions.supported_version",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\n")
    hellos = [line.split("\t") for line in out if line.strip()]
    # the enrollment: a GET /v1/bundle (clock-skew check, before the secret is sent), then POST /v1/enroll
    assert len(hellos) == 2, hellos
    for group, version in hellos:
        assert int(group, 0) == 0x11EC, group
        assert int(version, 0) == 0x0304, version
    secret = parse(join).secret.encode()
    assert secret not in pcap.read_bytes()
