"""Fuzz targets: every parser of untrusted bytes.

Join strings, SPIFFE IDs, the CONNECT preamble (both sides), the control-plane
API's JSON, enrollment CSRs (DER inside PEM), peer leaf certificates (the checks
after OpenSSL's), and the auditor's TLS parser, capture reader and whole
pipeline (flows, classification, report).

Each target raises only on a real bug: an input the parser should have
refused with its own error type, or an API answer of 500.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from tapproof import identity
from tapproof.audit.errors import AuditInputError, TLSParseError
from tapproof.audit.tls import parse as parse_tls
from tapproof.control import api, joinstring
from tapproof.errors import JoinStringError, RemoteProtocolError
from tapproof.tunnel import mux
from tapproof.tunnel.preamble import ClientPreamble, ServerPreamble

JOIN_SEEDS = [
    joinstring.JoinString(("127.0.0.1:7443",), "example.org", "ab" * 32, joinstring.new_secret()).encode().encode()
]
ID_SEEDS = [b"spiffe://example.org/host/web-1", b"spiffe://example.org/svc/redis", b"spiffe://a.b/tapproof/server"]
PREAMBLE_SEEDS = [
    b"CONNECT redis HTTP/1.1\r\nHost: redis\r\n\r\n",
    b"CONNECT 10.0.0.1:6379 HTTP/1.1\r\nHost: 10.0.0.1:6379\r\nTapproof-Source: 10.0.0.2:5000\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\n\r\n",
]
_API_SEED_BODIES = [
    ("POST", "/v1/tokens", {"host": "web-1", "ttl": "15m"}),
    ("POST", "/v1/policy/rules", {"action": "allow", "source": "host/web-*", "service": "redis", "ports": "6379"}),
    ("POST", "/v1/enroll", {"token": "A" * 43, "csr": "-----BEGIN CERTIFICATE REQUEST-----\n"}),
    ("POST", "/v1/revoke", {"host": "x", "reason": "r"}),
    ("PUT", "/v1/policy/default", {"default": "deny"}),
    ("PUT", "/v1/registration", {"advertise": "127.0.0.1:7444", "services": {"redis": ""}}),
    ("POST", "/v1/renew", {"csr": "-----BEGIN CERTIFICATE REQUEST-----\n"}),
]


def _route_index(method: str, path: str) -> int:
    return next(i for i, (m, p, _a, _h) in enumerate(api.ROUTES) if m == method and p.match(path))


# The first byte picks the route (see _API.__call__), the rest is the JSON body.
API_SEEDS = [bytes([_route_index(m, p)]) + json.dumps(body).encode() for m, p, body in _API_SEED_BODIES]


def _tls_seeds() -> list[bytes]:
    from tapproof.audit import synth

    tls12 = synth.server_hello(version=0x0303, group=None) + synth.server_key_exchange() + synth.server_hello_done()
    return [synth.client_hello(), synth.server_hello(), tls12, synth.client_hello() + synth.server_hello()]


def _pcap_seed() -> bytes:
    """A small real pcap: one TLS 1.3 connection with handshake and close (dpkt writer)."""
    import dpkt

    from tapproof.audit import synth

    buf = io.BytesIO()
    writer = dpkt.pcap.Writer(buf, linktype=1)
    exchanges = [("c", synth.client_hello()), ("s", synth.server_hello()), ("c", synth.app_data(200))]
    for ts, frame in synth.conversation(("10.0.0.1", 40000), ("10.0.0.2", 443), exchanges):
        writer.writepkt(frame, ts)
    return buf.getvalue()


def join_string(data: bytes) -> None:
    """Any text is a join string or a JoinStringError."""
    with contextlib.suppress(JoinStringError):
        joinstring.parse(data.decode("utf-8", "replace"))


def spiffe_id(data: bytes) -> None:
    """Any text parses exactly (prints back identically) or is refused."""
    text = data.decode("utf-8", "replace")
    try:
        sid = identity.parse(text)
    except identity.InvalidSpiffeID:
        return
    if str(sid) != text:
        raise AssertionError(f"normalised {text!r} to {sid}")


def preamble(data: bytes) -> None:
    """Both CONNECT machines: an event or RemoteProtocolError."""
    for machine in (ServerPreamble(), ClientPreamble("redis")):
        try:
            if machine.feed(data) is None:
                machine.feed_eof()
        except RemoteProtocolError:
            pass


def _mux_seeds() -> list[bytes]:
    client = mux.MuxConnection(client=True)
    sid = client.send_open("redis", "10.0.0.2:5000")
    client.send_open("10.0.0.1:6379")
    opens = client.data_to_send()
    server = mux.MuxConnection(client=False)
    server.receive_data(opens)
    server.send_result(sid, 200)
    server.send_data(sid, b"hello")
    server.send_fin(sid)
    server.send_reset(2)
    server.send_ping(b"12345678")
    server.send_goaway()
    return [opens, server.data_to_send()]


MUX_SEEDS = _mux_seeds()


def mux_frames(data: bytes) -> None:
    """Both mux machines (after one OPEN, so stream frames have a stream): events or RemoteProtocolError."""
    client = mux.MuxConnection(client=True)
    client.send_open("redis")
    for machine in (mux.MuxConnection(client=False), client):
        try:
            for i in range(0, len(data), 7):  # in pieces: frames split across reads
                machine.receive_data(data[i : i + 7])
        except RemoteProtocolError:
            pass


def tls_records(data: bytes) -> None:
    """The auditor's TLS parser: parsed or TLSParseError, for either direction."""
    for client, server in ((data, b""), (b"", data), (data, data)):
        with contextlib.suppress(TLSParseError):
            parse_tls(client, server)


def pcap_file(data: bytes) -> None:
    """The capture reader: packets or AuditInputError (and its subclasses)."""
    from tapproof.audit.capture import read_packets

    with tempfile.NamedTemporaryFile(suffix=".pcap") as f:
        f.write(data)
        f.flush()
        try:
            for _ in read_packets(f.name):
                pass
        except AuditInputError:
            pass


class _API:
    """A real ControlPlane on SQLite in a temp dir, called with fuzzed JSON bodies as the admin."""

    def __init__(self) -> None:
        from tapproof.control.config import ServerConfig, default_db
        from tapproof.control.service import ControlPlane
        from tapproof.pki.ca import init_ca
        from tapproof.store import open_store
        from tapproof.testing import FakeClock

        self.dir = Path(tempfile.mkdtemp(prefix="tapproof-fuzz-"))
        now = dt.datetime.now(dt.UTC)
        ca = init_ca(self.dir, "example.org", now)
        cfg = ServerConfig(self.dir, "example.org", default_db(self.dir))
        self.cp = ControlPlane(open_store(cfg.db, migrate=True), ca, cfg, FakeClock(now), ["127.0.0.1:7443"])
        self.admin = identity.admin_id("example.org")
        self.host = identity.host_id("example.org", "web-1")

    def close(self) -> None:
        """Close the store and delete the temp dir (it holds a CA key)."""
        import shutil

        self.cp.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __call__(self, data: bytes) -> None:
        routes = [(m, p.pattern.strip("^$").replace("\\", "").replace("(d{1,12})", "1")) for m, p, _a, _h in api.ROUTES]
        method, path = routes[data[0] % len(routes)] if data else routes[0]
        body = data[1:]
        for peer in (self.admin, self.host, None):
            resp = api.handle(self.cp, api.Request(method, path, {}, body, peer, "fuzz"))
            if resp.status >= 500:
                raise AssertionError(f"{method} {path} answered {resp.status} to {body[:80]!r}: {resp.body}")


def control_api() -> Callable[[bytes], None]:
    """A fresh API target (it owns a temp data dir)."""
    return _API()


def _csr_seeds() -> list[bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509 import load_pem_x509_csr

    from tapproof.pki import csr, keys

    out = []
    for algo, sid in (("ecdsa-p256", identity.host_id("example.org", "web-1")), ("ed25519", None)):
        pem = csr.build(keys.generate(algo), sid)  # type: ignore[arg-type]
        out.append(load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    return out


def csr_der(data: bytes) -> None:
    """An enrollment CSR (the fuzzed bytes are the DER inside the PEM): accepted or CSRRejected."""
    import base64

    from tapproof.errors import CSRRejected
    from tapproof.pki import csr

    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(data) + b"-----END CERTIFICATE REQUEST-----\n"
    for call in (
        lambda: csr.check(pem, identity.host_id("example.org", "web-1")),
        lambda: csr.public_key_der(pem),
    ):
        with contextlib.suppress(CSRRejected):
            call()


def _leaf_seeds() -> list[bytes]:
    from cryptography.hazmat.primitives import serialization

    from tapproof.pki.ca import init_ca

    with tempfile.TemporaryDirectory(prefix="tapproof-fuzz-") as d:
        ca = init_ca(Path(d), "example.org", dt.datetime.now(dt.UTC))
        creds = ca.credentials_for(
            identity.host_id("example.org", "web-1"), dt.datetime.now(dt.UTC), dt.timedelta(hours=1)
        )
        return [c.public_bytes(serialization.Encoding.DER) for c in (creds.leaf, ca.intermediate)]


def peer_leaf(data: bytes) -> None:
    """A peer's leaf after OpenSSL: what cryptography can load is checked by ours, accepted or PeerRejected."""
    import warnings

    from cryptography import x509
    from cryptography.utils import CryptographyDeprecationWarning

    from tapproof.errors import PeerRejected
    from tapproof.pki.verify import check_leaf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # e.g. a negative serial: still parsed
        try:
            cert = x509.load_der_x509_certificate(data)
        except (ValueError, x509.InvalidVersion):
            return  # the library refused it (OpenSSL would have, earlier)
        for usage in ("client", "server"):
            with contextlib.suppress(PeerRejected):
                check_leaf(cert, trust_domain="example.org", now=dt.datetime.now(dt.UTC), usage=usage)  # type: ignore[arg-type]


def _pipeline_seeds() -> list[bytes]:
    import dpkt

    from tapproof.audit import synth

    seeds = [_pcap_seed()]
    for exchanges in (
        [("c", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ("s", b"HTTP/1.1 200 OK\r\n\r\nhello")],
        [("s", b"SSH-2.0-OpenSSH_9.2\r\n"), ("c", b"SSH-2.0-OpenSSH_9.2\r\n")],
        [("c", b"*1\r\n$4\r\nPING\r\n"), ("s", b"+PONG\r\n")],
    ):
        buf = io.BytesIO()
        writer = dpkt.pcap.Writer(buf, linktype=1)
        for ts, frame in synth.conversation(("10.0.0.1", 40000), ("10.0.0.2", 6379), exchanges):
            writer.writepkt(frame, ts)
        seeds.append(buf.getvalue())
    return seeds


def audit_pipeline(data: bytes) -> None:
    """The whole auditor on a capture file: a report, or AuditInputError."""
    from tapproof.audit.pipeline import analyze
    from tapproof.audit.report import build_report

    with tempfile.NamedTemporaryFile(suffix=".pcap") as f:
        f.write(data)
        f.flush()
        try:
            report = build_report(analyze([f.name]))
        except AuditInputError:
            return
    json.dumps(report)  # the report must serialise


TARGETS: dict[str, tuple[Callable[[], Callable[[bytes], None]], list[bytes]]] = {
    "join-string": (lambda: join_string, JOIN_SEEDS),
    "spiffe-id": (lambda: spiffe_id, ID_SEEDS),
    "preamble": (lambda: preamble, PREAMBLE_SEEDS),
    "mux-frames": (lambda: mux_frames, MUX_SEEDS),
    "tls-records": (lambda: tls_records, _tls_seeds()),
    "pcap": (lambda: pcap_file, [_pcap_seed()]),
    "api-json": (control_api, API_SEEDS),
    "csr": (lambda: csr_der, _csr_seeds()),
    "peer-leaf": (lambda: peer_leaf, _leaf_seeds()),
    "audit-pipeline": (lambda: audit_pipeline, _pipeline_seeds()),
}
