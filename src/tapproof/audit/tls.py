"""A sans-I/O parser for the clear-text part of a TLS handshake.

Why hand-written: the auditor needs only the handshake messages a passive tap
can see (ClientHello, ServerHello, and for TLS <= 1.2 Certificate and
ServerKeyExchange), from buffers that may be cut anywhere, and it must treat
every byte as hostile. Python TLS libraries (ssl, pyOpenSSL, tlslite) parse a
handshake only as one of its two endpoints, not as an observer of both
directions; dpkt's ``ssl`` module raises assorted exception types on garbage
and does not know supported_versions, key_share or the PQ groups. So this
module reads the few structures it needs and raises only
:class:`TLSParseError`. Certificates themselves are parsed by
``cryptography.x509``.

Feed it the first bytes of each direction (``parse(client, server)``); it
returns a :class:`TLSInfo` describing what was seen so far, with ``need_*``
hints saying how many bytes the next step requires.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass, field

from cryptography import x509

from tapproof.audit.errors import TLSParseError

__all__ = ["HRR_RANDOM", "TLSInfo", "looks_like_tls", "parse", "parse_records"]

HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
_MAX_RECORD = 16384 + 2048
CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA = 20, 21, 22, 23
HS_CLIENT_HELLO, HS_SERVER_HELLO, HS_CERTIFICATE, HS_SKE, HS_SHD = 1, 2, 11, 12, 14
_H = struct.Struct("!H")


@dataclass(slots=True)
class TLSInfo:
    """What a passive observer learned from one TLS handshake."""

    client_hello: bool = False
    server_hello: bool = False
    hello_retry: bool = False
    version: int | None = None  # negotiated: supported_versions, else ServerHello.version
    cipher: int | None = None
    group: int | None = None  # ServerHello key_share (1.3) or ServerKeyExchange curve (1.2)
    dh_bits: int | None = None  # finite-field DHE prime size (TLS <= 1.2)
    sni: str | None = None
    alpn_offered: list[str] = field(default_factory=list)
    alpn: str | None = None  # selected, when visible (TLS <= 1.2 ServerHello)
    groups_offered: list[int] = field(default_factory=list)
    key_shares_offered: list[int] = field(default_factory=list)
    versions_offered: list[int] = field(default_factory=list)
    cert_subject: str | None = None
    cert_not_before: dt.datetime | None = None
    cert_not_after: dt.datetime | None = None
    alert: int | None = None  # first alert description seen in clear
    server_done: bool = False  # the server's clear-text flight is over
    app_data: bool = False  # application-data records seen
    need_client: int = 0  # bytes of client stream needed to progress (0: no more needed)
    need_server: int = 0


def looks_like_tls(data: bytes) -> bool:
    """True when ``data`` starts with a plausible TLS record header."""
    return (
        len(data) >= 5
        and 20 <= data[0] <= 24
        and data[1] == 3
        and data[2] <= 4
        and ((data[3] << 8) | data[4]) <= _MAX_RECORD
    )


def parse_records(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Split ``data`` into complete records ``(content_type, fragment)``.

    Returns the records and the byte count needed to complete the next partial
    record (0 when the buffer ends on a record boundary). Raises
    :class:`TLSParseError` on a header that is not TLS.
    """
    records: list[tuple[int, bytes]] = []
    pos, n = 0, len(data)
    while pos + 5 <= n:
        ct, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = (data[pos + 3] << 8) | data[pos + 4]
        if not (20 <= ct <= 24) or major != 3 or minor > 4 or length > _MAX_RECORD:
            raise TLSParseError(f"not a tls record header at offset {pos}")
        if pos + 5 + length > n:
            return records, pos + 5 + length
        records.append((ct, data[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return records, (pos + 5 if pos < n else 0)


class _Cur:
    """A bounds-checked cursor over a bytes buffer."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise TLSParseError("truncated tls structure")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(_H.unpack(self.take(2))[0])

    def u24(self) -> int:
        b = self.take(3)
        return (b[0] << 16) | (b[1] << 8) | b[2]

    def vec(self, width: int) -> _Cur:
        n = self.u8() if width == 1 else self.u16() if width == 2 else self.u24()
        sub = _Cur(self.buf, self.pos, self.pos + n)
        if sub.end > self.end:
            raise TLSParseError("tls vector overruns its parent")
        self.pos += n
        return sub

    def left(self) -> int:
        return self.end - self.pos


def _handshake_stream(data: bytes) -> tuple[bytes, int, int | None, int | None, bool]:
    """Clear-text handshake bytes of one direction.

    Returns (handshake bytes, bytes needed, first alert, offset in the handshake
    bytes where the first ChangeCipherSpec came (None if none), app data seen).
    Collection stops at the first application-data record. Handshake records
    after a ChangeCipherSpec are still collected: in TLS 1.3 a ServerHello may
    follow a HelloRetryRequest and its CCS; the caller decides what to trust.
    """
    records, need = parse_records(data)
    hs = bytearray()
    alert: int | None = None
    ccs_at: int | None = None
    app = False
    for ct, frag in records:
        if ct == CT_HANDSHAKE:
            hs += frag
        elif ct == CT_CCS:
            if ccs_at is None:
                ccs_at = len(hs)
        elif ct == CT_APPDATA:
            app = True
            break
        elif ct == CT_ALERT and ccs_at is None and alert is None and len(frag) == 2:
            alert = frag[1]
    return bytes(hs), need, alert, ccs_at, app


def _messages(hs: bytes, stop_at: int | None = None) -> tuple[list[tuple[int, bytes, int]], int]:
    """Split handshake bytes into ``(type, body, offset)`` messages; plus bytes missing for the next."""
    out: list[tuple[int, bytes, int]] = []
    pos, n = 0, len(hs)
    while pos + 4 <= n:
        length = (hs[pos + 1] << 16) | (hs[pos + 2] << 8) | hs[pos + 3]
        if pos + 4 + length > n:
            return out, pos + 4 + length - n
        out.append((hs[pos], hs[pos + 4 : pos + 4 + length], pos))
        pos += 4 + length
    return out, (4 - (n - pos) if pos < n else 0)


def _client_hello(body: bytes, info: TLSInfo) -> None:
    c = _Cur(body)
    legacy = c.u16()
    c.take(32)
    c.vec(1)
    suites = c.vec(2)
    if suites.end - suites.pos < 2 or (suites.end - suites.pos) % 2:
        raise TLSParseError("bad cipher suite list")
    c.vec(1)
    info.client_hello = True
    info.versions_offered = [legacy]
    if c.left() == 0:
        return
    exts = c.vec(2)
    while exts.left():
        etype = exts.u16()
        e = exts.vec(2)
        if etype == 0:  # server_name
            names = e.vec(2)
            while names.left():
                kind = names.u8()
                name = names.vec(2)
                if kind == 0 and info.sni is None:
                    info.sni = name.take(name.left()).decode("ascii", "replace")
        elif etype == 16:  # ALPN
            protos = e.vec(2)
            while protos.left():
                p = protos.vec(1)
                info.alpn_offered.append(p.take(p.left()).decode("ascii", "replace"))
        elif etype == 10:  # supported_groups
            g = e.vec(2)
            while g.left() >= 2:
                info.groups_offered.append(g.u16())
        elif etype == 43:  # supported_versions
            v = e.vec(1)
            info.versions_offered = []
            while v.left() >= 2:
                info.versions_offered.append(v.u16())
        elif etype == 51:  # key_share
            ks = e.vec(2)
            while ks.left():
                info.key_shares_offered.append(ks.u16())
                ks.vec(2)


def _server_hello(body: bytes, info: TLSInfo) -> None:
    c = _Cur(body)
    version = c.u16()
    random = c.take(32)
    c.vec(1)
    cipher = c.u16()
    c.u8()
    hrr = random == HRR_RANDOM
    selected_version: int | None = None
    share: int | None = None
    alpn: str | None = None
    if c.left():
        exts = c.vec(2)
        while exts.left():
            etype = exts.u16()
            e = exts.vec(2)
            if etype == 43 and e.left() == 2:
                selected_version = e.u16()
            elif etype == 51 and e.left() >= 2:
                share = e.u16()  # ServerHello: KeyShareEntry; HRR: selected_group
            elif etype == 16:
                protos = e.vec(2)
                if protos.left():
                    p = protos.vec(1)
                    alpn = p.take(p.left()).decode("ascii", "replace")
    if hrr:
        info.hello_retry = True
        if share is not None:
            info.group = share
        return
    info.server_hello = True
    info.version = selected_version if selected_version is not None else version
    info.cipher = cipher
    if share is not None:
        info.group = share
    info.alpn = alpn


def _certificate(body: bytes, info: TLSInfo) -> None:
    c = _Cur(body)
    certs = c.vec(3)
    if not certs.left():
        return
    der = certs.vec(3)
    raw = der.take(der.left())
    try:
        cert = x509.load_der_x509_certificate(raw)
        info.cert_subject = cert.subject.rfc4514_string()
        info.cert_not_before = cert.not_valid_before_utc
        info.cert_not_after = cert.not_valid_after_utc
    except ValueError:
        info.cert_subject = "(unparsable certificate)"


def _server_key_exchange(body: bytes, info: TLSInfo, kx: str) -> None:
    c = _Cur(body)
    if kx == "ECDHE":
        if c.u8() == 3:  # named_curve
            info.group = c.u16()
    elif kx == "DHE":
        p = c.vec(2)
        prime = p.take(p.left()).lstrip(b"\x00")
        info.dh_bits = len(prime) * 8


def parse(client: bytes, server: bytes) -> TLSInfo:
    """Parse the clear-text handshake seen in each direction.

    ``client``/``server`` are the first bytes of each direction (either may be
    empty or cut anywhere). Raises :class:`TLSParseError` when a direction
    that starts like TLS stops being TLS.
    """
    from tapproof.audit.groups import cipher_suite  # local: keep import graph flat

    info = TLSInfo()
    if client:
        hs, need, alert, ccs_at, app = _handshake_stream(client)
        msgs, missing = _messages(hs)
        info.alert = alert
        info.app_data = app
        if msgs and msgs[0][0] == HS_CLIENT_HELLO:
            _client_hello(msgs[0][1], info)
        elif msgs:
            raise TLSParseError(f"first client handshake message is type {msgs[0][0]}")
        if not info.client_hello:
            info.need_client = need or (len(client) + missing if missing else 0)
    if server:
        hs, need, alert, ccs_at, app = _handshake_stream(server)
        msgs, missing = _messages(hs)
        if info.alert is None:
            info.alert = alert
        info.app_data = info.app_data or app
        for mtype, body, offset in msgs:
            after_ccs = ccs_at is not None and offset >= ccs_at
            if after_ccs and not (mtype == HS_SERVER_HELLO and info.hello_retry and not info.server_hello):
                info.server_done = True  # the rest is encrypted (TLS 1.2 Finished)
                break
            if mtype == HS_SERVER_HELLO and not info.server_hello:
                _server_hello(body, info)
            elif not info.server_hello:
                raise TLSParseError(f"server handshake message type {mtype} before the server hello")
            elif mtype == HS_CERTIFICATE and info.version != 0x0304:
                _certificate(body, info)
            elif mtype == HS_SKE and info.cipher is not None:
                _server_key_exchange(body, info, cipher_suite(info.cipher).kx)
            elif mtype == HS_SHD:
                info.server_done = True
                break
            if info.server_hello and info.version == 0x0304:
                info.server_done = True  # everything after the TLS 1.3 ServerHello is encrypted
                break
        if info.server_hello and (app or (ccs_at is not None and not info.hello_retry)):
            info.server_done = True
        if not info.server_done:
            info.need_server = need or (len(server) + missing if missing else len(server) + 1)
    return info
