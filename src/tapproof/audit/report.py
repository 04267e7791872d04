"""Reports as data: per-flow records, the summary, links worst-first, a timeline.

The JSON document is ``{"summary": ..., "links": [...], "timeline": [...],
"flows": [...]}``; field by field in ``docs/audit.md``.
"""

from __future__ import annotations

import re
import socket
from collections import defaultdict
from typing import Any

from tapproof.audit.flows import Flow
from tapproof.audit.groups import cipher_suite, group, tls_version_name
from tapproof.audit.pipeline import AuditResult
from tapproof.audit.verdict import _PQ_SSH_KEX, ENCRYPTED_GRADES, GRADES, worst

__all__ = ["FAIL_ON", "build_report", "fails", "flow_record", "redact"]

FAIL_ON = {
    "plaintext": frozenset("F"),
    "tls12": frozenset("CDF"),
    "classical": frozenset("BCDF"),
    "undetermined": frozenset("BCDF?"),
}
_KEYWORD_LINES = (
    "GET POST PUT HEAD DELETE OPTIONS PATCH CONNECT TRACE HTTP/1.0 HTTP/1.1 HTTP/2.0",
    "PRI SET AUTH PING HELLO INFO SELECT HSET HGET LPUSH RPUSH MGET MSET DEL",
    "EXPIRE OK ERR EHLO HELO MAIL RCPT DATA QUIT STARTTLS USER PASS FEAT SYST",
    "LIST RETR STOR CAPA STLS get set add delete gets cas incr decr stats version",
    "VALUE STORED END user database",
)
_KEYWORDS = frozenset(w for line in _KEYWORD_LINES for w in line.split())
_TOKEN = re.compile(rb"[A-Za-z0-9_./-]+|.", re.DOTALL)


def redact(sample: bytes, limit: int = 48) -> str:
    """Show a plaintext sample's protocol keywords and its shape, not its content.

    Keywords (``GET``, ``SET``, ``EHLO``...) stay; other letters become ``x``,
    digits ``9``; control bytes are escaped.
    """
    out: list[str] = []
    for m in _TOKEN.finditer(sample[:limit]):
        tok = m.group()
        text = tok.decode("latin-1")
        if text in _KEYWORDS:
            out.append(text)
        elif len(tok) == 1 and not (tok.isalnum()):
            b = tok[0]
            out.append({"\r": "\\r", "\n": "\\n", "\t": "\\t"}.get(text, text if 32 <= b < 127 else f"\\x{b:02x}"))
        else:
            out.append("".join("9" if ch.isdigit() else "x" if ch.isalpha() else ch for ch in text))
    return "".join(out) + ("…" if len(sample) > limit else "")


def _ip(addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(addr) == 16 else socket.AF_INET, addr)


def flow_record(flow: Flow) -> dict[str, Any]:
    """One flow as a JSON-ready dict (the ``flows`` entries)."""
    cl, v = flow.cls, flow.verdict
    info = cl.tls if cl is not None else None
    rec: dict[str, Any] = {
        "src": _ip(flow.client),
        "sport": flow.cport,
        "dst": _ip(flow.server),
        "dport": flow.sport,
        "protocol": cl.protocol if cl else "unknown",
        "verdict": v.verdict if v else "undetermined",
        "grade": v.grade if v else "?",
        "reason": v.reason if v else "not classified",
        "tls_version": None,
        "cipher": None,
        "group": None,
        "group_code": None,
        "pq": None,
        "sni": None,
        "alpn": None,
        "alpn_offered": [],
        "cert_subject": None,
        "cert_not_before": None,
        "cert_not_after": None,
        "upgraded_from": cl.upgraded_from if cl else None,
        "ssh_kex": cl.ssh_kex if cl else None,
        "midstream": flow.midstream,
        "bytes_c2s": flow.bytes_c2s,
        "bytes_s2c": flow.bytes_s2c,
        "packets": flow.packets,
        "first_seen": round(flow.first_seen, 6),
        "last_seen": round(flow.last_seen, 6),
        "sample": None,
    }
    if info is not None:
        if info.version is not None:
            rec["tls_version"] = tls_version_name(info.version)
        if info.cipher is not None:
            rec["cipher"] = cipher_suite(info.cipher).name
        if info.group is not None:
            g = group(info.group)
            rec.update(group=g.name, group_code=f"0x{g.code:04X}", pq=g.pq)
        elif info.dh_bits:
            rec.update(group=f"ffdhe-custom-{info.dh_bits}", pq=False)
        elif info.server_hello:
            rec["pq"] = False
        rec["sni"] = info.sni
        rec["alpn"] = info.alpn
        rec["alpn_offered"] = info.alpn_offered
        rec["cert_subject"] = info.cert_subject
        if info.cert_not_before is not None and info.cert_not_after is not None:
            rec["cert_not_before"] = info.cert_not_before.isoformat()
            rec["cert_not_after"] = info.cert_not_after.isoformat()
    if cl is not None and cl.protocol == "ssh" and cl.ssh_kex:
        rec["pq"] = any(cl.ssh_kex.startswith(k) for k in _PQ_SSH_KEX)
    if v is not None and v.verdict == "plaintext" and cl is not None and cl.sample:
        rec["sample"] = f"{cl.evidence or 'client'}: {redact(cl.sample)}"
    return rec


def _links(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["src"], r["dst"], r["dport"])].append(r)
    links = []
    for (src, dst, port), rs in groups.items():
        links.append(
            {
                "src": src,
                "dst": dst,
                "dport": port,
                "grade": worst([r["grade"] for r in rs]),
                "flows": len(rs),
                "bytes": sum(r["bytes_c2s"] + r["bytes_s2c"] for r in rs),
                "protocols": sorted({r["protocol"] for r in rs}),
                "grades": {g: n for g in GRADES if (n := sum(1 for r in rs if r["grade"] == g))},
            }
        )
    rank = {g: i for i, g in enumerate(GRADES)}
    links.sort(key=lambda x: (rank[x["grade"]], -x["bytes"]))
    return links


def _timeline(records: list[dict[str, Any]], buckets: int = 60) -> list[dict[str, Any]]:
    """Encrypted vs total bytes over time (each flow's bytes spread evenly over its lifetime)."""
    if not records:
        return []
    t0 = min(r["first_seen"] for r in records)
    t1 = max(r["last_seen"] for r in records)
    span = max(t1 - t0, 1e-6)
    width = span / buckets
    total = [0.0] * buckets
    enc = [0.0] * buckets
    for r in records:
        b = r["bytes_c2s"] + r["bytes_s2c"]
        if not b:
            continue
        i0 = min(int((r["first_seen"] - t0) / width), buckets - 1)
        i1 = min(int((r["last_seen"] - t0) / width), buckets - 1)
        share = b / (i1 - i0 + 1)
        for i in range(i0, i1 + 1):
            total[i] += share
            if r["grade"] in ENCRYPTED_GRADES:
                enc[i] += share
    return [
        {"t": round(t0 + i * width, 6), "bytes": round(total[i]), "encrypted_bytes": round(enc[i])}
        for i in range(buckets)
    ]


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def build_report(result: AuditResult) -> dict[str, Any]:
    """The whole report as a JSON-ready dict."""
    records = [flow_record(f) for f in result.flows]
    by_grade = {g: {"flows": 0, "bytes": 0} for g in GRADES}
    protocols: dict[str, int] = defaultdict(int)
    for r in records:
        by_grade[r["grade"]]["flows"] += 1
        by_grade[r["grade"]]["bytes"] += r["bytes_c2s"] + r["bytes_s2c"]
        protocols[r["protocol"]] += 1
    with_data = [r for r in records if r["bytes_c2s"] + r["bytes_s2c"]]
    total_bytes = sum(r["bytes_c2s"] + r["bytes_s2c"] for r in records)
    enc_flows = sum(1 for r in with_data if r["grade"] in ENCRYPTED_GRADES)
    enc_bytes = sum(by_grade[g]["bytes"] for g in ENCRYPTED_GRADES)
    pq_flows = sum(1 for r in with_data if r["grade"] == "A")
    summary = {
        "files": result.files,
        "packets": result.packets,
        "tcp_packets": result.tcp_packets,
        "flows": len(records),
        "flows_with_payload": len(with_data),
        "bytes": total_bytes,
        "by_grade": by_grade,
        "protocols": dict(sorted(protocols.items())),
        "coverage": {
            "flows": _share(enc_flows, len(with_data)),
            "bytes": _share(enc_bytes, total_bytes),
            "pq_flows": _share(pq_flows, len(with_data)),
            "pq_bytes": _share(by_grade["A"]["bytes"], total_bytes),
        },
        "worst_grade": worst([r["grade"] for r in with_data]) if with_data else "?",
        "first_seen": min((r["first_seen"] for r in records), default=None),
        "last_seen": max((r["last_seen"] for r in records), default=None),
        "warnings": result.warnings,
        "corrupt": result.corrupt,
    }
    return {"summary": summary, "links": _links(records), "timeline": _timeline(records), "flows": records}


def fails(report: dict[str, Any], condition: str) -> list[dict[str, Any]]:
    """The flows (with payload) that meet a ``--fail-on`` condition."""
    bad = FAIL_ON[condition]
    return [r for r in report["flows"] if r["grade"] in bad and r["bytes_c2s"] + r["bytes_s2c"]]
