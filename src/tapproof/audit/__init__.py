"""``tapproof audit``: from packet captures to a link-by-link encryption verdict.

Modules, one job each: :mod:`capture` (pcap/pcapng, link layers, IP, TCP),
:mod:`flows` (flow table and bounded reassembly), :mod:`tls` (handshake
parser), :mod:`groups` (TLS registries), :mod:`classify` (protocol detection),
:mod:`verdict` (grades), :mod:`pipeline` (the streaming loop), :mod:`report`
(JSON and summary), :mod:`html` (the self-contained HTML report) and
:mod:`live` (capture with tcpdump, then the same pipeline).
"""

from __future__ import annotations

from tapproof.audit.errors import AuditInputError, CaptureCorrupt, TLSParseError, UnknownLinkType
from tapproof.audit.pipeline import AuditResult, analyze
from tapproof.audit.report import build_report

__all__ = [
    "AuditInputError",
    "AuditResult",
    "CaptureCorrupt",
    "TLSParseError",
    "UnknownLinkType",
    "analyze",
    "build_report",
]
