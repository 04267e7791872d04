"""Independent scanners against an agent's tunnel port and the control plane's API port.

sslyze (PyPI, in its own venv: it pins ``cryptography<47``, tapproof needs
``>=50``; ``make scanners`` builds ``.venv-scan``) and testssl.sh (Debian) run
against real processes, and the tests parse their JSON.

sslyze's bundled OpenSSL (and the system OpenSSL 3.0 that testssl.sh and
``s_client`` use) offers only classical groups, and tapproof accepts only
X25519MLKEM768. So:

* default configuration: every version, TLS 1.3 included, is refused; each
  refusal is logged with its reason (``not-post-quantum``, ``not-tls13``)
  and counted;
* with the explicit ``--unsafe-classical-groups`` (logged at warning, in
  ``/status`` and metrics), the scanners get far enough to see the rest:
  TLS 1.3 only, nothing at or below TLS 1.2 accepted, only AEAD suites of at
  least 128 bits, client authentication REQUIRED; with a client certificate
  the scan completes the same way.

testssl.sh 3.0 cannot present a client certificate; its protocol probe
(sockets) runs on both ports in both modes (marked ``soak``: ~80 s of
waiting, run by ``make soak`` in CI). On a TLS 1.3 port that requires a
client certificate its ``openssl s_client`` pre-check often fails
("cannot connect"): that one combination may skip, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tapproof.agent.state import AgentPaths
from tapproof.units import parse_hostport
from tests.battery.test_client_certs import server_metric_at
from tests.helpers import require, require_tool
from tests.integration import procs

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
STRONG_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"}
OLD_VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2")
S_CLIENT = ("openssl", "s_client", "-tls1_3", "-groups", "X25519", "-brief")  # OpenSSL 3.0, no ML-KEM
TESTSSL = ("testssl", "--quiet", "--color", "0", "--protocols", "--openssl-timeout", "5")
SSLYZE_MODERN_SCANS = ("--tlsv1_2", "--tlsv1_3", "--elliptic_curves")
SSLYZE_SCANS = ("--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3", "--elliptic_curves")


def sslyze_path() -> str:
    """sslyze from $TAPPROOF_SSLYZE, ``.venv-scan`` (``make scanners``) or PATH."""
    for cand in (os.environ.get("TAPPROOF_SSLYZE", ""), str(ROOT / ".venv-scan" / "bin" / "sslyze")):
        if cand and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("sslyze")
    require(found is not None, "needs sslyze: run `make scanners` (builds .venv-scan)")
    assert found is not None
    return found


@dataclasses.dataclass
class Setup:
    """One server and one agent, in one mode."""

    classical: bool
    srv: procs.ServerProc
    agent: procs.AgentProc
    tmp: Path

    def ports(self) -> dict[str, tuple[str, int]]:
        return {"tunnel": self.agent.tunnel, "api": parse_hostport(self.srv.address)}

    def refusals(self, port: str, reason: str) -> float:
        if port == "tunnel":
            return self.agent.metric("tapproof_agent_refusals_total", direction="inbound", reason=reason)
        return server_metric_at(self.srv.metrics, "tapproof_server_handshakes_failed_total", reason=reason)

    def client_cert(self) -> tuple[Path, Path]:
        p = AgentPaths(self.agent.data_dir)
        return p.cert, p.key


def _setup(tmp: Path, classical: bool) -> Iterator[Setup]:
    env_key = "TAPPROOF_UNSAFE_CLASSICAL_GROUPS"  # read by `server run` and `agent run` (the flag's variable)
    if classical:
        os.environ[env_key] = "1"
    try:
        srv = procs.start_server(tmp / "srv")
        try:
            agent = procs.start_agent(tmp / "agent", srv.token("scanned"))
        except BaseException:
            srv.stop()
            raise
    finally:
        os.environ.pop(env_key, None)
    try:
        yield Setup(classical, srv, agent, tmp)
    finally:
        agent.stop()
        srv.stop()


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from _setup(tmp_path_factory.mktemp("default"), classical=False)


@pytest.fixture(scope="module")
def classical(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from _setup(tmp_path_factory.mktemp("classical"), classical=True)


def sslyze(addr: tuple[str, int], out: Path, cert: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """Run sslyze on ``addr``; return its one server result (JSON).

    With a client certificate only the scans that use sslyze's modern OpenSSL run: its
    legacy OpenSSL (SSL 2.0 to TLS 1.1 probes) cannot load an ECDSA chain with name
    constraints ("invalid input") and the scan then stalls. Without one, every version."""
    argv = [sslyze_path(), f"--json_out={out}", "--quiet"]
    if cert is not None:
        argv += [*SSLYZE_MODERN_SCANS, "--cert", str(cert[0]), "--key", str(cert[1])]
    else:
        argv += SSLYZE_SCANS
    res = subprocess.run(
        [*argv, f"{addr[0]}:{addr[1]}"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        stdin=subprocess.DEVNULL,  # OpenSSL would wait for a key passphrase on a terminal
    )
    assert res.returncode == 0, res.stderr
    results = json.loads(out.read_text())["server_scan_results"]
    assert len(results) == 1
    return results[0]  # type: ignore[no-any-return]


# --- default: a classical scanner is refused everywhere -----------------------------------------------
@pytest.mark.parametrize("port", ["tunnel", "api"])
def test_sslyze_default_refused(default: Setup, port: str, tmp_path: Path) -> None:
    before = {r: default.refusals(port, r) for r in ("not-post-quantum", "not-tls13")}
    result = sslyze(default.ports()[port], tmp_path / "out.json")
    assert result["connectivity_status"] == "ERROR"
    assert "could not find a TLS version" in result["connectivity_error_trace"]  # TLS 1.3 refused too
    assert result["scan_result"] is None
    # each probe was refused and counted for its reason: TLS 1.3 for the group, the rest for the version
    assert default.refusals(port, "not-post-quantum") > before["not-post-quantum"]
    assert default.refusals(port, "not-tls13") > before["not-tls13"]


# --- --unsafe-classical-groups: the scanner sees the rest ----------------------------------------------
def _accepted(scan: dict[str, Any], version: str) -> set[str]:
    part = scan[f"{version}_cipher_suites"]
    assert part["status"] == "COMPLETED", part
    return {s["cipher_suite"]["name"] for s in part["result"]["accepted_cipher_suites"]}


def _check_tls13_only(result: dict[str, Any]) -> None:
    assert result["scan_status"] == "COMPLETED"
    assert result["connectivity_result"]["highest_tls_version_supported"] == "TLS_1_3"
    scan = result["scan_result"]
    for version in OLD_VERSIONS:
        if scan[f"{version}_cipher_suites"]["status"] == "NOT_SCHEDULED":  # with a client certificate: sslyze()
            assert version != "tls_1_2"
            continue
        assert _accepted(scan, version) == set(), version  # nothing at or below TLS 1.2
    suites = _accepted(scan, "tls_1_3")
    assert suites, "TLS 1.3 must be accepted"
    assert suites <= STRONG_SUITES, suites  # no weak cipher: AEAD, >= 128 bits
    for s in scan["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]:
        assert s["cipher_suite"]["key_size"] >= 128
    curves = scan["elliptic_curves"]["result"]
    assert {c["name"] for c in curves["supported_curves"]} <= {"X25519", "secp256r1", "secp384r1"}


@pytest.mark.parametrize("port", ["tunnel", "api"])
def test_sslyze_classical_without_cert(classical: Setup, port: str, tmp_path: Path) -> None:
    result = sslyze(classical.ports()[port], tmp_path / "out.json")
    _check_tls13_only(result)
    assert result["connectivity_result"]["client_auth_requirement"] == "REQUIRED"


@pytest.mark.parametrize("port", ["tunnel", "api"])
def test_sslyze_classical_with_cert(classical: Setup, port: str, tmp_path: Path) -> None:
    result = sslyze(classical.ports()[port], tmp_path / "out.json", classical.client_cert())
    _check_tls13_only(result)
    assert result["network_configuration"]["tls_client_auth_credentials"] is not None


def test_unsafe_classical_groups_is_loud(classical: Setup, default: Setup) -> None:
    """The switch shows on every start (warning), in /status and in both processes' metrics."""
    for setup, on in ((classical, 1.0), (default, 0.0)):
        agent_warn = [e for e in setup.agent.events("unsafe-classical-groups") if e.get("level") == "warning"]
        srv_warn = [e for e in procs.read_events(setup.srv.log_path) if e.get("event") == "unsafe-classical-groups"]
        assert (len(agent_warn), len(srv_warn)) == ((1, 1) if on else (0, 0))
        assert setup.agent.status()["unsafe_classical_groups"] is bool(on)
        assert setup.agent.metric("tapproof_agent_unsafe_classical_groups") == on
        assert server_metric_at(setup.srv.metrics, "tapproof_server_unsafe_classical_groups") == on
    status = json.loads(classical.srv.admin("status", "--json"))
    assert status["unsafe_classical_groups"] is True


# --- OpenSSL 3.0's s_client offering X25519 only ----------------------------------------------------------
@pytest.mark.parametrize("port", ["tunnel", "api"])
def test_classical_only_client_refused_by_default(default: Setup, port: str) -> None:
    require_tool("openssl")
    host, p = default.ports()[port]
    before = default.refusals(port, "not-post-quantum")
    cert, key = default.client_cert()  # even with a valid certificate
    res = subprocess.run(
        [*S_CLIENT, "-connect", f"{host}:{p}", "-cert", str(cert), "-key", str(key)],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode != 0
    assert "CONNECTION ESTABLISHED" not in res.stdout + res.stderr
    procs.wait_for(lambda: default.refusals(port, "not-post-quantum") == before + 1, 10, "refusal counted")
    events = default.agent.events("tunnel-refused") if port == "tunnel" else procs.read_events(default.srv.log_path)
    assert any(e.get("reason") == "not-post-quantum" for e in events)


# --- testssl.sh ----------------------------------------------------------------------------------------------
def run_testssl(addr: tuple[str, int], out: Path) -> dict[str, str]:
    """testssl.sh --protocols on ``addr``: {id: finding}."""
    subprocess.run(
        [*TESTSSL, "--jsonfile", str(out), f"{addr[0]}:{addr[1]}"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.exists()
    return {str(f["id"]): str(f["finding"]) for f in json.loads(out.read_text())}


def probe_both_ports(setup: Setup, tmp: Path) -> dict[str, dict[str, str]]:
    """testssl.sh on the tunnel and the API port at once (it mostly waits)."""
    require_tool("testssl")
    found: dict[str, dict[str, str]] = {}
    threads = [
        threading.Thread(target=lambda p=p, a=a: found.__setitem__(p, run_testssl(a, tmp / f"{p}.json")))
        for p, a in setup.ports().items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(found) == {"tunnel", "api"}, found
    print(json.dumps(found, indent=1), file=sys.stderr)
    return found


@pytest.mark.soak  # ~30 s of testssl.sh waiting: runs in `make soak` (CI), not in `make test`
def test_testssl_default_finds_nothing_to_talk_to(default: Setup, tmp_path: Path) -> None:
    """testssl.sh (system OpenSSL 3.0, classical groups only) cannot negotiate any version."""
    for port, findings in probe_both_ports(default, tmp_path).items():
        assert "doesn't seem to be a TLS/SSL enabled server" in findings.get("optimal_proto", ""), (port, findings)
        assert not any(findings.get(v, "").startswith("offered") for v in ("TLS1_2", "TLS1_3")), (port, findings)


@pytest.mark.soak
@pytest.mark.allowed_skip
def test_testssl_classical_protocols(classical: Setup, tmp_path: Path) -> None:
    """With --unsafe-classical-groups: TLS 1.3 offered, nothing older. testssl.sh 3.0 cannot send a
    client certificate, and on a TLS 1.3 port that requires one its ``openssl s_client`` probe often
    ends with "cannot connect" before the protocol checks: only that combination may skip."""
    found = probe_both_ports(classical, tmp_path)
    unreliable = [p for p, f in found.items() if "cannot connect" in f.get("optimal_proto", "")]
    for port, findings in found.items():
        if port in unreliable:
            continue
        for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2"):
            assert findings[old].startswith("not offered"), (port, old, findings[old])
        assert findings["TLS1_3"].startswith("offered"), (port, findings["TLS1_3"])
    if unreliable:
        pytest.skip(f"testssl.sh could not probe {', '.join(unreliable)} (TLS 1.3 + client certificate required)")
