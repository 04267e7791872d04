"""Reading packet captures (pcap and pcapng) and decoding packets down to TCP.

dpkt parses the file framing metadata (pcap file header, pcapng section and
interface blocks: byte order, link type, timestamp resolution). The
per-packet record headers and the Ethernet/SLL/IP/TCP headers are read with
``struct`` on the hot path: dpkt builds a Python object per header (several
microseconds each, and a ``Decimal`` per timestamp for nanosecond pcaps), and
its readers yield a silently short last packet on a truncated file, where we
want :class:`CaptureCorrupt` with the count of good packets.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import dpkt
from dpkt import pcapng

from tapproof.audit.errors import AuditInputError, CaptureCorrupt, UnknownLinkType

__all__ = [
    "LINKTYPES",
    "TCPSegment",
    "decode",
    "read_packets",
]

# Link types we decode (LINKTYPE_* values as stored in files).
LT_NULL, LT_ETHERNET, LT_RAW_BSD, LT_RAW, LT_LOOP = 0, 1, 12, 101, 108
LT_SLL, LT_IPV4, LT_IPV6, LT_SLL2 = 113, 228, 229, 276
LINKTYPES = {
    LT_NULL: "null/loopback",
    LT_ETHERNET: "ethernet",
    LT_RAW_BSD: "raw ip",
    LT_RAW: "raw ip",
    LT_LOOP: "openbsd loopback",
    LT_SLL: "linux cooked v1",
    LT_IPV4: "raw ipv4",
    LT_IPV6: "raw ipv6",
    LT_SLL2: "linux cooked v2",
}

_CHUNK = 1 << 22
_MAX_CAPLEN = 1 << 20  # larger than any snaplen a real tool writes
_MAX_BLOCK = 1 << 24


class TCPSegment(NamedTuple):
    """A decoded TCP segment: addresses are packed bytes (4 or 16 long)."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes  # as captured (may be shorter than ``length`` with a small snaplen)
    length: int  # payload length on the wire, from the IP header


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise AuditInputError(f"{path}: cannot open capture: {exc.strerror or exc}") from exc


def read_packets(path: str) -> Iterator[tuple[float, int, bytes]]:
    """Yield ``(timestamp, linktype, frame)`` for every packet of a pcap or pcapng file.

    Raises :class:`AuditInputError` before the first packet when the file is not
    a capture (or uses a link type we do not decode), and
    :class:`CaptureCorrupt` after the last good packet when the file breaks.
    """
    f = _open(path)
    with f:
        head = f.read(24)
        if len(head) < 4:
            raise AuditInputError(f"{path}: not a pcap or pcapng file (too short)")
        f.seek(0)
        magic = head[:4]
        if magic == b"\x0a\x0d\x0d\x0a":
            yield from _pcapng(f, path)
        elif magic in (
            b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",
        ):  # fmt: skip
            yield from _pcap(f, path)
        else:
            raise AuditInputError(f"{path}: not a pcap or pcapng file (magic {magic.hex()})")


def _pcap(f: BinaryIO, path: str) -> Iterator[tuple[float, int, bytes]]:
    raw = f.read(24)
    if len(raw) < 24:
        raise AuditInputError(f"{path}: truncated pcap file header")
    little = raw[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")
    fh = dpkt.pcap.LEFileHdr(raw) if little else dpkt.pcap.FileHdr(raw)
    nano = raw[:4] in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = int(fh.linktype) & 0x0FFFFFFF  # upper bits: FCS length flags
    if linktype not in LINKTYPES:
        raise UnknownLinkType(linktype, path)
    scale = 1e-9 if nano else 1e-6
    rec = struct.Struct("<IIII" if little else ">IIII")
    buf, pos, count = b"", 0, 0
    while True:
        if len(buf) - pos < 16:
            more = f.read(_CHUNK)
            if not more:
                if len(buf) > pos:
                    raise CaptureCorrupt("truncated packet header", count, path)
                return
            buf, pos = buf[pos:] + more, 0
            continue
        sec, frac, caplen, _wirelen = rec.unpack_from(buf, pos)
        if caplen > _MAX_CAPLEN:
            raise CaptureCorrupt(f"impossible packet length {caplen}", count, path)
        end = pos + 16 + caplen
        if end > len(buf):
            more = f.read(max(_CHUNK, caplen))
            if not more:
                raise CaptureCorrupt("truncated packet", count, path)
            buf, pos = buf[pos:] + more, 0
            continue
        yield sec + frac * scale, linktype, buf[pos + 16 : end]
        pos = end
        count += 1


class _Iface(NamedTuple):
    linktype: int
    divisor: float
    offset: int


def _idb(block: bytes, little: bool, path: str, count: int) -> _Iface:
    try:
        idb = (pcapng.InterfaceDescriptionBlockLE if little else pcapng.InterfaceDescriptionBlock)(block)
    except (dpkt.UnpackError, struct.error, ValueError) as exc:
        raise CaptureCorrupt(f"bad interface description block ({exc})", count, path) from exc
    divisor, offset = 1e6, 0
    for opt in idb.opts:
        if opt.code == pcapng.PCAPNG_OPT_IF_TSRESOL and len(opt.data) >= 1:
            v = opt.data[0]
            divisor = float((2 if v & 0x80 else 10) ** (v & 0x7F))
        elif opt.code == pcapng.PCAPNG_OPT_IF_TSOFFSET and len(opt.data) >= 8:
            offset = struct.unpack("<q" if little else ">q", opt.data[:8])[0]
    return _Iface(int(idb.linktype), divisor or 1e6, offset)


def _pcapng(f: BinaryIO, path: str) -> Iterator[tuple[float, int, bytes]]:
    little = True
    ifaces: list[_Iface] = []
    count = 0
    first = True
    while True:
        head = f.read(12)
        if not head:
            return
        if len(head) < 12:
            raise CaptureCorrupt("truncated block header", count, path)
        if head[:4] == b"\x0a\x0d\x0d\x0a":  # section header: byte order may change
            little = head[8:12] == b"\x4d\x3c\x2b\x1a"
            if not little and head[8:12] != b"\x1a\x2b\x3c\x4d":
                if first:
                    raise AuditInputError(f"{path}: bad pcapng byte-order magic")
                raise CaptureCorrupt("bad section header", count, path)
            ifaces = []
        first = False
        btype, blen = struct.unpack("<II" if little else ">II", head[:8])
        if blen < 12 or blen % 4 or blen > _MAX_BLOCK:
            raise CaptureCorrupt(f"bad block length {blen}", count, path)
        body = f.read(blen - 12)
        if len(body) < blen - 12:
            raise CaptureCorrupt("truncated block", count, path)
        block = head + body
        if btype == 1:  # interface description
            iface = _idb(block, little, path, count)
            if iface.linktype not in LINKTYPES:
                raise UnknownLinkType(iface.linktype, path)
            ifaces.append(iface)
        elif btype in (6, 2):  # enhanced packet / obsolete packet block
            e = "<" if little else ">"
            if btype == 6:
                iid, hi, lo, caplen, _olen = struct.unpack_from(e + "IIIII", block, 8)
                data_at = 28
            else:
                iid, _drops, hi, lo, caplen, _olen = struct.unpack_from(e + "HHIIII", block, 8)
                data_at = 28
            if iid >= len(ifaces):
                raise CaptureCorrupt(f"packet for undeclared interface {iid}", count, path)
            if data_at + caplen > blen - 4:
                raise CaptureCorrupt("packet longer than its block", count, path)
            iface = ifaces[iid]
            ts = iface.offset + ((hi << 32) | lo) / iface.divisor
            yield ts, iface.linktype, block[data_at : data_at + caplen]
            count += 1
        elif btype == 3:  # simple packet block: interface 0, no timestamp
            if not ifaces:
                raise CaptureCorrupt("packet before any interface", count, path)
            yield 0.0, ifaces[0].linktype, block[16 : blen - 4]
            count += 1


def file_size(path: str) -> int:
    """Size of a capture file in bytes (0 when unknown)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


_ETH_VLAN = (0x8100, 0x88A8, 0x9100)
_U16 = struct.Struct("!H")
_TCP = struct.Struct("!HHIIBB")
_IP6_EXT = (0, 43, 60)


def _network_offset(linktype: int, frame: bytes) -> tuple[int, int]:
    """Return ``(offset, ip_version)`` of the IP header in ``frame``; version 0 if not IP."""
    if linktype == LT_ETHERNET:
        off = 12
        et = _U16.unpack_from(frame, off)[0]
        while et in _ETH_VLAN:
            off += 4
            et = _U16.unpack_from(frame, off)[0]
        off += 2
        return off, 4 if et == 0x0800 else 6 if et == 0x86DD else 0
    if linktype == LT_SLL:
        et = _U16.unpack_from(frame, 14)[0]
        return 16, 4 if et == 0x0800 else 6 if et == 0x86DD else 0
    if linktype == LT_SLL2:
        et = _U16.unpack_from(frame, 0)[0]
        return 20, 4 if et == 0x0800 else 6 if et == 0x86DD else 0
    if linktype in (LT_NULL, LT_LOOP):
        fam = int.from_bytes(frame[:4], "big" if linktype == LT_LOOP else "little")
        if fam > 0xFFFF:  # written on a host of the other byte order
            fam = int.from_bytes(frame[:4], "big")
        return 4, 4 if fam == 2 else 6 if fam in (10, 24, 28, 30) else 0
    if linktype in (LT_RAW, LT_RAW_BSD, LT_IPV4, LT_IPV6):
        return 0, frame[0] >> 4 if frame else 0
    raise UnknownLinkType(linktype)


def decode(linktype: int, frame: bytes) -> TCPSegment | None:
    """Decode a frame down to TCP; ``None`` for anything else (or too short to say)."""
    try:
        off, ver = _network_offset(linktype, frame)
        if ver == 4:
            vihl = frame[off]
            if vihl >> 4 != 4 or frame[off + 9] != 6:
                return None
            if _U16.unpack_from(frame, off + 6)[0] & 0x1FFF:  # a non-first fragment
                return None
            ihl = (vihl & 0x0F) * 4
            total = _U16.unpack_from(frame, off + 2)[0]
            src, dst = frame[off + 12 : off + 16], frame[off + 16 : off + 20]
            tcp = off + ihl
            ip_payload = total - ihl if total >= ihl else len(frame) - tcp
        elif ver == 6:
            if frame[off] >> 4 != 6:
                return None
            plen = _U16.unpack_from(frame, off + 4)[0]
            nxt = frame[off + 6]
            src, dst = frame[off + 8 : off + 24], frame[off + 24 : off + 40]
            tcp = off + 40
            ip_payload = plen if plen else len(frame) - tcp
            while nxt != 6:
                if nxt in _IP6_EXT:
                    ext = (frame[tcp + 1] + 1) * 8
                elif nxt == 44:  # fragment header
                    if _U16.unpack_from(frame, tcp + 2)[0] & 0xFFF8:
                        return None
                    ext = 8
                elif nxt == 51:  # authentication header
                    ext = (frame[tcp + 1] + 2) * 4
                else:
                    return None
                nxt = frame[tcp]
                tcp += ext
                ip_payload -= ext
        else:
            return None
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(frame, tcp)
        hl = (doff >> 4) * 4
        if hl < 20:
            return None
        length = max(ip_payload - hl, 0)
        start = tcp + hl
        return TCPSegment(src, dst, sport, dport, seq, ack, flags, frame[start : start + length], length)
    except (IndexError, struct.error):
        return None
