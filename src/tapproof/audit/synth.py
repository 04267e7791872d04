"""Building blocks for synthetic captures: TLS handshake records and TCP frames.

Used by the tests and by ``bench/audit_speed.py``; nothing in the auditor
itself depends on it. Records follow RFC 8446 / RFC 5246 layouts byte for byte
(random and key material are dummy bytes of the right length).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

__all__ = [
    "PcapWriter",
    "app_data",
    "certificate",
    "client_hello",
    "conversation",
    "frame",
    "server_hello",
    "server_hello_done",
    "server_key_exchange",
]

_KEY_LEN = {0x11EC: 1216, 0x11EB: 1249, 0x11ED: 1665, 0x6399: 1216, 0x001D: 32, 0x0017: 65, 0x0018: 97}
_SERVER_KEY_LEN = {0x11EC: 1120, 0x11EB: 1153, 0x11ED: 1665, 0x6399: 1120, 0x001D: 32, 0x0017: 65, 0x0018: 97}


def _v8(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def _v16(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _v24(b: bytes) -> bytes:
    return struct.pack("!I", len(b))[1:] + b


def _ext(etype: int, body: bytes) -> bytes:
    return struct.pack("!H", etype) + _v16(body)


def _record(ctype: int, body: bytes, version: int = 0x0303) -> bytes:
    out = b""
    for i in range(0, max(len(body), 1), 16384):
        out += struct.pack("!BHH", ctype, version, len(body[i : i + 16384])) + body[i : i + 16384]
    return out


def _handshake(mtype: int, body: bytes) -> bytes:
    return bytes([mtype]) + _v24(body)


def client_hello(
    *,
    sni: str | None = "example.org",
    versions: Sequence[int] = (0x0304, 0x0303),
    groups: Sequence[int] = (0x11EC, 0x001D, 0x0017),
    key_shares: Sequence[int] = (0x11EC, 0x001D),
    ciphers: Sequence[int] = (0x1302, 0x1301, 0x1303, 0xC02F, 0xC030),
    alpn: Sequence[str] = ("h2", "http/1.1"),
    record: bool = True,
) -> bytes:
    """A ClientHello (as a TLS record unless ``record=False``)."""
    exts = b""
    if sni is not None:
        exts += _ext(0, _v16(b"\x00" + _v16(sni.encode())))
    exts += _ext(10, _v16(b"".join(struct.pack("!H", g) for g in groups)))
    if alpn:
        exts += _ext(16, _v16(b"".join(_v8(p.encode()) for p in alpn)))
    if versions:
        exts += _ext(43, _v8(b"".join(struct.pack("!H", v) for v in versions)))
    if key_shares:
        shares = b"".join(struct.pack("!H", g) + _v16(bytes(_KEY_LEN.get(g, 32))) for g in key_shares)
        exts += _ext(51, _v16(shares))
    body = (
        struct.pack("!H", 0x0303)
        + bytes(range(32))
        + _v8(bytes(32))
        + _v16(b"".join(struct.pack("!H", c) for c in ciphers))
        + _v8(b"\x00")
        + _v16(exts)
    )
    hs = _handshake(1, body)
    return _record(22, hs, 0x0301) if record else hs


def server_hello(
    *,
    version: int = 0x0304,
    cipher: int = 0x1302,
    group: int | None = 0x11EC,
    hrr: bool = False,
    alpn: str | None = None,
) -> bytes:
    """A ServerHello record (TLS 1.3 style with supported_versions when ``version`` is 0x0304)."""
    exts = b""
    if version == 0x0304:
        exts += _ext(43, struct.pack("!H", 0x0304))
        if group is not None:
            exts += _ext(
                51,
                struct.pack("!H", group)
                if hrr
                else struct.pack("!H", group) + _v16(bytes(_SERVER_KEY_LEN.get(group, 32))),
            )
    if alpn:
        exts += _ext(16, _v16(_v8(alpn.encode())))
    random_ = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C") if hrr else bytes(32)
    body = struct.pack("!H", min(version, 0x0303)) + random_ + _v8(bytes(32)) + struct.pack("!HB", cipher, 0)
    if exts:
        body += _v16(exts)
    out = _record(22, _handshake(2, body))
    if version == 0x0304:
        out += _record(20, b"\x01")  # middlebox-compatibility ChangeCipherSpec
    return out


def certificate(der: bytes) -> bytes:
    """A TLS 1.2 Certificate record carrying one DER certificate."""
    return _record(22, _handshake(11, _v24(_v24(der))))


def server_key_exchange(curve: int = 0x001D) -> bytes:
    """A TLS 1.2 ECDHE ServerKeyExchange record (named curve, dummy point and signature)."""
    body = (
        b"\x03" + struct.pack("!H", curve) + _v8(bytes(_SERVER_KEY_LEN.get(curve, 32))) + b"\x04\x03" + _v16(bytes(72))
    )
    return _record(22, _handshake(12, body))


def server_hello_done() -> bytes:
    """A ServerHelloDone record."""
    return _record(22, _handshake(14, b""))


def app_data(n: int, rng: random.Random | None = None) -> bytes:
    """``n`` bytes of payload as application-data records (random content)."""
    rng = rng or random.Random(0)  # noqa: S311  (filler bytes, not secrets)
    return _record(23, rng.randbytes(n))


# ----------------------------------------------------------------------------- frames

_ETH_HDR = bytes.fromhex("020000000002020000000001")


def frame(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    *,
    linktype: int = 1,
) -> bytes:
    """A TCP segment over IPv4 or IPv6 (by address syntax) framed for ``linktype``."""
    import ipaddress

    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535, 0, 0)
    if s.version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0, s.packed, d.packed
        )
        et, fam = 0x0800, 2
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, s.packed, d.packed)
        et, fam = 0x86DD, 10
    l3 = ip + tcp + payload
    if linktype == 1:
        return _ETH_HDR + struct.pack("!H", et) + l3
    if linktype == 113:
        return struct.pack("!HHH8sH", 0, 772, 6, bytes(8), et) + l3
    if linktype == 276:
        return struct.pack("!HHIHBB8s", et, 0, 1, 772, 0, 6, bytes(8)) + l3
    if linktype == 0:
        return struct.pack("<I", fam) + l3
    if linktype == 108:
        return struct.pack("!I", fam) + l3
    if linktype in (12, 101, 228, 229):
        return l3
    raise ValueError(f"linktype {linktype} not supported by synth")


def conversation(
    client: tuple[str, int],
    server: tuple[str, int],
    exchanges: Iterable[tuple[str, bytes]],
    *,
    t0: float = 1_700_000_000.0,
    mss: int = 1448,
    linktype: int = 1,
    handshake: bool = True,
    close: bool = True,
    isn: tuple[int, int] = (1000, 5000),
) -> Iterator[tuple[float, bytes]]:
    """Frames for one TCP connection: ``exchanges`` are ``("c"|"s", bytes)`` in order."""
    (ca, cp), (sa, sp) = client, server
    cseq, sseq = isn
    t = t0
    SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01

    def f(c2s: bool, flags: int, payload: bytes = b"") -> bytes:
        if c2s:
            return frame(ca, sa, cp, sp, cseq, sseq, flags, payload, linktype=linktype)
        return frame(sa, ca, sp, cp, sseq, cseq, flags, payload, linktype=linktype)

    if handshake:
        yield t, f(True, SYN)
        cseq += 1
        t += 1e-4
        yield t, f(False, SYN | ACK)
        sseq += 1
        t += 1e-4
        yield t, f(True, ACK)
    for who, data in exchanges:
        c2s = who == "c"
        for i in range(0, len(data), mss):
            chunk = data[i : i + mss]
            t += 1e-5
            yield t, f(c2s, ACK | PSH, chunk)
            if c2s:
                cseq += len(chunk)
            else:
                sseq += len(chunk)
    if close:
        t += 1e-4
        yield t, f(True, FIN | ACK)
        cseq += 1
        t += 1e-4
        yield t, f(False, FIN | ACK)
        sseq += 1
        t += 1e-4
        yield t, f(True, ACK)


class PcapWriter:
    """A minimal, fast classic-pcap writer (microsecond timestamps)."""

    def __init__(self, f: BinaryIO, linktype: int = 1, snaplen: int = 262144) -> None:
        self.f = f
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype))
        self._rec = struct.Struct("<IIII")

    def write(self, ts: float, data: bytes) -> None:
        """Append one packet."""
        sec = int(ts)
        usec = round((ts - sec) * 1e6)
        self.f.write(self._rec.pack(sec, usec, len(data), len(data)) + data)
