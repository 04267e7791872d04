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
API_SEEDS = [
    json.dumps(b).encode()
    for b in (
        {"host": "web-1", "ttl": "15m"},
        {"action": "allow", "source": "host/web-*", "service": "redis", "ports": "6379"},
        {"token": "A" * 43, "csr": "-----BEGIN CERTIFICATE REQUEST-----\n"},
        {"host": "x", "reason": "r"},
        {"default": "deny"},
        {"advertise": "127.0.0.1:7444", "services": {"redis": ""}},
    )
]
# A ClientHello offering TLS 1.3 with an X25519MLKEM768 key share (lengths approximate: it is a seed).
_CH = bytes.fromhex(
    "16030100c8010000c40303"
    + "00" * 32
    + "00"
    + "0002130101000099"
    + "002b0003020304"
    + "000a0004000211ec"
    + "00330026002411ec0020"
    + "00" * 32
)


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
    "tls-records": (lambda: tls_records, [_CH]),
    "pcap": (lambda: pcap_file, [io.BytesIO(b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00" + b"\x00" * 16).getvalue()]),
    "api-json": (control_api, API_SEEDS),
}
