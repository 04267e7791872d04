"""Real captures on loopback (root + tcpdump): every verdict checked against what the test set up
and cross-checked against tshark's dissection of the same file.

One capture for the module (tcpdump start/stop is the slow part): TLS 1.3 and TLS 1.2 from curl
against ``openssl s_server``, X25519MLKEM768 between two pyOpenSSL peers, plaintext HTTP, redis,
PostgreSQL without and with ``sslmode=require``. Then the HTML report in headless Chromium.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from tapproof.audit.html import render_html
from tapproof.audit.pipeline import analyze
from tapproof.audit.report import build_report
from tests.helpers import free_port, require_root, require_tool
from tests.pgserver import start_postgres

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.tcpdump]


def _cert(d: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cp, kp = d / "cert.pem", d / "key.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    kp.chmod(0o600)
    return cp, kp


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _pq_pair(port: int, cert: Path, key: Path) -> None:
    """A pyOpenSSL server and client (bundled OpenSSL: X25519MLKEM768 by default) exchanging bytes."""
    sctx = SSL.Context(SSL.TLS_METHOD)
    sctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    sctx.use_certificate_file(str(cert))
    sctx.use_privatekey_file(str(key))
    lsock = socket.create_server(("127.0.0.1", port))
    done = threading.Event()

    def serve() -> None:
        conn, _ = lsock.accept()
        tls = SSL.Connection(sctx, conn)
        tls.set_accept_state()
        tls.do_handshake()
        data = tls.recv(65536)
        tls.sendall(data * 4)
        tls.shutdown()
        conn.close()
        done.set()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    cctx = SSL.Context(SSL.TLS_METHOD)
    cctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    cctx.load_verify_locations(str(cert))
    cctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    sock = socket.create_connection(("127.0.0.1", port))
    c = SSL.Connection(cctx, sock)
    c.set_tlsext_host_name(b"localhost")
    c.set_connect_state()
    c.do_handshake()
    c.sendall(b"ping" * 1000)
    got = b""
    while len(got) < 16000:
        try:
            chunk = c.recv(65536)
        except SSL.ZeroReturnError:
            break
        if not chunk:
            break
        got += chunk
    sock.close()
    done.wait(5)
    lsock.close()
    th.join(5)


def _enable_pg_ssl(pg: Any, cert: Path, key: Path) -> None:
    """Turn on TLS in the private PostgreSQL (files owned by its service account)."""
    dst_c, dst_k = pg.datadir / "server.crt", pg.datadir / "server.key"
    dst_c.write_bytes(cert.read_bytes())
    dst_k.write_bytes(key.read_bytes())
    if pg.run_as:
        pw = pwd.getpwnam(pg.run_as)
        for p in (dst_c, dst_k):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    dst_k.chmod(0o600)
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET ssl = on")
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run all the traffic under one tcpdump; yield the pcap path, the ports and the report."""
    require_root()
    require_tool("tcpdump", "tshark", "openssl", "curl", "redis-server", "redis-cli")
    d = tmp_path_factory.mktemp("audit-real")
    d.chmod(0o755)
    cert, key = _cert(d)
    ports = {n: free_port() for n in ("tls13", "tls12", "pq", "http", "redis")}
    pg = start_postgres(d / "pg")
    ports["pg"] = pg.port
    pcap = d / "real.pcap"
    bpf = " or ".join(f"tcp port {p}" for p in ports.values())
    procs: list[subprocess.Popen[bytes]] = []
    dump = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-w", str(pcap), "-U", "-s", "0", "-n", "-Z", "root", bpf],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not (pcap.exists() and pcap.stat().st_size >= 24) and time.monotonic() < deadline:
            time.sleep(0.05)  # tcpdump writes the file header once it listens
        time.sleep(0.3)
        _enable_pg_ssl(pg, cert, key)
        common = ["-cert", str(cert), "-key", str(key), "-www", "-quiet"]
        procs.append(
            subprocess.Popen(
                ["openssl", "s_server", "-accept", f"127.0.0.1:{ports['tls13']}", "-tls1_3", *common],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        procs.append(
            subprocess.Popen(
                ["openssl", "s_server", "-accept", f"127.0.0.1:{ports['tls12']}", "-tls1_2", *common],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        procs.append(
            subprocess.Popen(
                ["python3", "-m", "http.server", str(ports["http"]), "--bind", "127.0.0.1"],
                cwd=d,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(ports["redis"]),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        for name in ("tls13", "tls12", "http", "redis"):
            _wait_port(ports[name])
        curl = ["curl", "-sS", "--max-time", "10", "-o", os.devnull, "--cacert", str(cert)]
        subprocess.run([*curl, f"https://localhost:{ports['tls13']}/"], check=True)
        subprocess.run([*curl, "--tls-max", "1.2", f"https://localhost:{ports['tls12']}/"], check=True)
        subprocess.run([*curl, f"http://127.0.0.1:{ports['http']}/"], check=True)
        subprocess.run(
            ["redis-cli", "-p", str(ports["redis"]), "SET", "canary", "s3cret-value"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        _pq_pair(ports["pq"], cert, key)
        for mode in ("disable", "require"):
            with psycopg.connect(pg.url + f"?sslmode={mode}") as conn:
                conn.execute("SELECT 1").fetchall()
        time.sleep(1.0)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        dump.terminate()
        dump.wait(10)
        pg.cleanup()
    report = build_report(analyze([str(pcap)]))
    return {"pcap": pcap, "ports": ports, "report": report, "dir": d}


def _flows(cap: dict[str, Any], name: str) -> list[dict[str, Any]]:
    port = cap["ports"][name]
    flows = [f for f in cap["report"]["flows"] if f["dport"] == port and f["bytes_c2s"]]  # not the port probes
    assert flows, f"no {name} flow with payload in the capture"
    return flows


def _tshark_server_hellos(cap: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """Server port -> (supported_version, key_share group) as tshark dissects the ServerHellos."""
    decode = [a for p in ("tls13", "tls12", "pq") for a in ("-d", f"tcp.port=={cap['ports'][p]},tls")]
    decode += ["-d", f"tcp.port=={cap['ports']['pg']},pgsql"]
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(cap["pcap"]),
            *decode,
            "-Y",
            "tls.handshake.type == 2",
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "tcp.srcport",
            "-e",
            "tls.handshake.extensions.supported_version",
            "-e",
            "tls.handshake.extensions_key_share_group",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = {}
    for line in out.splitlines():
        port, ver, grp = [*line.split("|"), "", "", ""][:3]
        result[int(port)] = (ver, grp)
    return result


def test_tls13_classical_from_curl(capture: dict[str, Any]) -> None:
    (f,) = _flows(capture, "tls13")
    assert (f["protocol"], f["tls_version"], f["grade"], f["pq"]) == ("tls", "TLS 1.3", "B", False)
    assert f["sni"] == "localhost"
    ver, grp = _tshark_server_hellos(capture)[capture["ports"]["tls13"]]
    assert ver == "0x0304"
    assert int(grp, 0) == int(f["group_code"], 16)


def test_tls12_from_curl(capture: dict[str, Any]) -> None:
    (f,) = _flows(capture, "tls12")
    assert (f["tls_version"], f["grade"]) == ("TLS 1.2", "C")
    assert f["cipher"].startswith("TLS_ECDHE_ECDSA_WITH_AES_")
    assert f["cert_subject"] == "CN=localhost"
    ver, _ = _tshark_server_hellos(capture)[capture["ports"]["tls12"]]
    assert ver == ""  # no supported_versions in a TLS 1.2 ServerHello


def test_pq_pair_is_grade_a(capture: dict[str, Any]) -> None:
    (f,) = _flows(capture, "pq")
    assert (f["group"], f["group_code"], f["pq"], f["grade"]) == ("X25519MLKEM768", "0x11EC", True, "A")
    _, grp = _tshark_server_hellos(capture)[capture["ports"]["pq"]]
    assert int(grp, 0) == 0x11EC


def test_plaintext_http_and_redis(capture: dict[str, Any]) -> None:
    (h,) = _flows(capture, "http")
    assert (h["protocol"], h["grade"]) == ("http", "F")
    assert h["sample"].startswith("client: GET /")
    (r,) = _flows(capture, "redis")
    assert (r["protocol"], r["grade"]) == ("redis", "F")
    assert "s3cret" not in r["sample"]


def test_postgres_plain_and_ssl(capture: dict[str, Any]) -> None:
    flows = _flows(capture, "pg")
    plain = [f for f in flows if f["protocol"] == "postgresql"]
    tls = [f for f in flows if f["protocol"] == "tls"]
    assert plain
    assert all(f["grade"] == "F" for f in plain)
    assert len(tls) == 1
    assert (tls[0]["upgraded_from"], tls[0]["tls_version"]) == ("postgresql", "TLS 1.3")
    assert tls[0]["grade"] in ("A", "B")
    assert capture["ports"]["pg"] in _tshark_server_hellos(capture)


def test_summary_counts_every_flow(capture: dict[str, Any]) -> None:
    s = capture["report"]["summary"]
    assert s["warnings"] == []
    assert s["worst_grade"] == "F"
    assert 0 < s["coverage"]["flows"] < 1


def test_html_renders_in_headless_chromium(capture: dict[str, Any]) -> None:
    require_tool("chromium")
    html = capture["dir"] / "report.html"
    html.write_text(render_html(capture["report"]))
    shot = capture["dir"] / "report.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("TAPPROOF_AUDIT_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(shot.read_bytes())
