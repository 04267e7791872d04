"""Capture reading: pcap and pcapng written by dpkt's writers, every link type, bad files."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import dpkt
import pytest

from tapproof.audit import synth
from tapproof.audit.capture import decode, read_packets
from tapproof.audit.errors import AuditInputError, CaptureCorrupt, UnknownLinkType
from tapproof.audit.pipeline import analyze
from tapproof.audit.report import build_report

LINKTYPES = [0, 1, 12, 101, 108, 113, 228, 276]


def _frames(linktype: int, v6: bool = False) -> list[tuple[float, bytes]]:
    c, s = ("fd00::1", "fd00::2") if v6 else ("10.0.0.1", "10.0.0.2")
    if (linktype == 228 and v6) or (linktype == 229 and not v6):
        pytest.skip("address family does not fit the link type")
    return list(
        synth.conversation(
            (c, 40000), (s, 443), [("c", synth.client_hello()), ("s", synth.server_hello())], linktype=linktype
        )
    )


def _write_pcap(path: Path, linktype: int, frames: list[tuple[float, bytes]], *, ng: bool = False) -> None:
    with path.open("wb") as f:
        w = dpkt.pcapng.Writer(f, linktype=linktype) if ng else dpkt.pcap.Writer(f, linktype=linktype)
        for ts, data in frames:
            w.writepkt(data, ts=ts)


@pytest.mark.parametrize("ng", [False, True], ids=["pcap", "pcapng"])
@pytest.mark.parametrize("linktype", LINKTYPES)
def test_link_types_round_trip(tmp_path: Path, linktype: int, ng: bool) -> None:
    p = tmp_path / "x.cap"
    _write_pcap(p, linktype, _frames(linktype), ng=ng)
    result = analyze([str(p)])
    assert not result.warnings
    assert len(result.flows) == 1
    rec = build_report(result)["flows"][0]
    assert (rec["src"], rec["dst"], rec["dport"], rec["grade"]) == ("10.0.0.1", "10.0.0.2", 443, "A")


@pytest.mark.parametrize("linktype", [1, 113, 276, 101, 229])
def test_ipv6(tmp_path: Path, linktype: int) -> None:
    p = tmp_path / "v6.pcap"
    _write_pcap(p, linktype, _frames(linktype, v6=True))
    rec = build_report(analyze([str(p)]))["flows"][0]
    assert (rec["src"], rec["dst"], rec["grade"]) == ("fd00::1", "fd00::2", "A")


def test_vlan_tag_and_non_tcp_are_handled() -> None:
    f = synth.frame("10.0.0.1", "10.0.0.2", 1, 2, 0, 0, 0x02)
    tagged = f[:12] + b"\x81\x00\x00\x05" + f[12:]
    seg = decode(1, tagged)
    assert seg is not None
    assert seg.dport == 2
    udp = bytearray(f)
    udp[14 + 9] = 17
    assert decode(1, bytes(udp)) is None
    assert decode(1, b"\x00" * 10) is None


def test_nanosecond_pcap(tmp_path: Path) -> None:
    p = tmp_path / "ns.pcap"
    with p.open("wb") as f:
        w = dpkt.pcap.Writer(f, linktype=1, nano=True)
        for ts, data in _frames(1):
            w.writepkt(data, ts=ts)
    result = analyze([str(p)])
    assert result.flows[0].first_seen == pytest.approx(1_700_000_000.0, abs=1e-3)


def test_truncated_file_reports_what_was_read(tmp_path: Path) -> None:
    p = tmp_path / "t.pcap"
    _write_pcap(p, 1, _frames(1))
    data = p.read_bytes()
    p.write_bytes(data[:-30])
    with pytest.raises(CaptureCorrupt) as ei:
        list(read_packets(str(p)))
    assert ei.value.packets_read == len(_frames(1)) - 1
    result = analyze([str(p)])
    assert result.corrupt
    assert result.warnings
    assert build_report(result)["flows"][0]["grade"] == "A"


def test_corrupt_caplen(tmp_path: Path) -> None:
    p = tmp_path / "c.pcap"
    _write_pcap(p, 1, _frames(1))
    data = bytearray(p.read_bytes())
    struct.pack_into("<I", data, 24 + 8, 0x7FFFFFFF)
    p.write_bytes(bytes(data))
    with pytest.raises(CaptureCorrupt) as ei:
        list(read_packets(str(p)))
    assert ei.value.packets_read == 0


def test_not_a_capture_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "n.txt"
    p.write_text("hello world, not a capture")
    with pytest.raises(AuditInputError):
        list(read_packets(str(p)))
    with pytest.raises(AuditInputError):
        list(read_packets(str(tmp_path / "missing.pcap")))


def test_unknown_link_type(tmp_path: Path) -> None:
    p = tmp_path / "u.pcap"
    _write_pcap(p, 147, [])
    with pytest.raises(UnknownLinkType) as ei:
        list(read_packets(str(p)))
    assert ei.value.linktype == 147


def test_pcapng_multiple_sections_and_interfaces(tmp_path: Path) -> None:
    buf = io.BytesIO()
    w = dpkt.pcapng.Writer(buf, linktype=1)
    for ts, data in _frames(1)[:3]:
        w.writepkt(data, ts=ts)
    w2 = dpkt.pcapng.Writer(buf, linktype=113)  # a second section (appended capture)
    for ts, data in _frames(113)[3:]:
        w2.writepkt(data, ts=ts)
    p = tmp_path / "multi.pcapng"
    p.write_bytes(buf.getvalue())
    result = analyze([str(p)])
    assert [f.verdict.grade for f in result.flows if f.verdict] == ["A"]
