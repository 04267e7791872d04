"""The committed real capture still gives the verdicts recorded with it (see tests/vectors/audit/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

from tapproof.audit.pipeline import analyze
from tapproof.audit.report import build_report

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "audit"


def test_loopback_mixed_vector() -> None:
    expected = json.loads((VECTORS / "loopback-mixed.expected.json").read_text())
    report = build_report(analyze([str(VECTORS / "loopback-mixed.pcap")]))
    keys = ("sport", "dport", "protocol", "grade", "tls_version", "group", "upgraded_from")
    got = [{k: f[k] for k in keys} for f in report["flows"] if f["bytes_c2s"]]
    assert got == expected
    assert {f["grade"] for f in got} == {"A", "B", "C", "F"}
