"""What the tap read: reassembled TCP payloads searched for the canary, and the auditor's verdict."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dpkt

from tapproof.audit.pipeline import analyze
from tapproof.audit.report import build_report

__all__ = ["CaptureView", "inspect_capture", "streams"]

PQ_GROUP = "X25519MLKEM768"


def streams(pcap: Path) -> dict[tuple[str, int, str, int], bytes]:
    """Each direction's payload, in sequence order (duplicates dropped): what a tap can reassemble."""
    segs: dict[tuple[str, int, str, int], dict[int, bytes]] = defaultdict(dict)
    with pcap.open("rb") as fh:
        reader = dpkt.pcap.UniversalReader(fh)
        linktype = reader.datalink()
        for _ts, buf in reader:
            try:
                if linktype == dpkt.pcap.DLT_EN10MB:
                    ip = dpkt.ethernet.Ethernet(buf).data
                elif linktype == dpkt.pcap.DLT_LINUX_SLL:
                    ip = dpkt.sll.SLL(buf).data
                else:
                    ip = dpkt.ip.IP(buf)
            except (dpkt.UnpackError, ValueError):
                continue
            tcp = getattr(ip, "data", None)
            if not isinstance(tcp, dpkt.tcp.TCP) or not tcp.data:
                continue
            src = dpkt.utils.inet_to_str(ip.src)
            dst = dpkt.utils.inet_to_str(ip.dst)
            segs[(src, tcp.sport, dst, tcp.dport)].setdefault(tcp.seq, bytes(tcp.data))
    out = {}
    for key, by_seq in segs.items():
        first = min(by_seq, key=lambda s: (s - next(iter(by_seq))) & 0xFFFFFFFF)
        ordered = sorted(by_seq.items(), key=lambda kv: (kv[0] - first) & 0xFFFFFFFF)
        out[key] = b"".join(p for _s, p in ordered)
    return out


@dataclass(slots=True)
class CaptureView:
    """One capture, as the demo reports it."""

    path: Path
    canary_seen: bool
    bytes: int
    packets: int
    flows: int
    protocols: list[str]
    tls_versions: list[str]
    groups: list[str]
    grade: str
    pq: bool  # every flow with payload is TLS with the PQ hybrid group
    excerpt: str  # what the tap read around the canary (or the first plaintext bytes)
    report: dict[str, Any] = field(repr=False, default_factory=dict)


def _excerpt(data: bytes, canary: bytes) -> str:
    at = data.find(canary)
    window = data[max(0, at - 40) : at + len(canary) + 20] if at >= 0 else data[:60]
    return "".join(chr(b) if 32 <= b < 127 else "." for b in window)


def inspect_capture(pcap: Path, canary: str) -> CaptureView:
    """Search the capture for the canary and grade it with the auditor."""
    needle = canary.encode()
    data = streams(pcap)
    hit = next((v for v in data.values() if needle in v), None)
    raw_hit = needle in pcap.read_bytes()
    report = build_report(analyze([str(pcap)]))
    flows = [f for f in report["flows"] if f["bytes_c2s"] + f["bytes_s2c"]]
    summary = report["summary"]
    return CaptureView(
        path=pcap,
        canary_seen=hit is not None or raw_hit,
        bytes=int(summary["bytes"]),
        packets=int(summary["packets"]),
        flows=len(flows),
        protocols=sorted({str(f["protocol"]) for f in flows}),
        tls_versions=sorted({str(f["tls_version"]) for f in flows if f["tls_version"]}),
        groups=sorted({str(f["group"]) for f in flows if f["group"]}),
        grade=str(summary["worst_grade"]),
        pq=bool(flows) and all(f["group"] == PQ_GROUP and f["tls_version"] == "TLS 1.3" for f in flows),
        excerpt=_excerpt(hit if hit is not None else b"".join(data.values()), needle),
        report=report,
    )
