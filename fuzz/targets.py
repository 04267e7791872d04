"""Fuzz targets: join strings, SPIFFE IDs, the control-plane API, the auditor's TLS and pcap parsers.

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


TARGETS: dict[str, tuple[Callable[[], Callable[[bytes], None]], list[bytes]]] = {
    "join-string": (lambda: join_string, JOIN_SEEDS),
    "spiffe-id": (lambda: spiffe_id, ID_SEEDS),
    "preamble": (lambda: preamble, PREAMBLE_SEEDS),
    "tls-records": (lambda: tls_records, _tls_seeds()),
    "pcap": (lambda: pcap_file, [_pcap_seed()]),
    "api-json": (control_api, API_SEEDS),
}
