"""The agent's two kinds of connection log lines, each paired with its metric.

* a refusal: one ``tunnel-refused`` line with ``direction`` and ``reason``,
  plus ``tapproof_agent_refusals_total{direction,reason}``;
* a finished tunnel: one ``tunnel-closed`` line with peer identity, service,
  bytes each way, duration, negotiated group and end reason, plus
  ``tapproof_agent_tunnels_total`` and ``tapproof_agent_bytes_total``.
"""

from __future__ import annotations

import logging
from typing import Any

from tapproof.agent.metrics import BYTES, REFUSALS, TUNNELS
from tapproof.errors import PeerRejected
from tapproof.logs import log_event
from tapproof.tunnel.relay import RelayResult

log = logging.getLogger("tapproof.agent.tunnel")

__all__ = ["finished", "handshake_reason", "mux_connection", "refused"]

_NOT_TLS = (
    "wrong version number",
    "http request",
    "https proxy request",
    "unknown protocol",
    "packet length too long",
    "record layer failure",
    "record too long",
    "bad record type",
)


def handshake_reason(exc: PeerRejected, verify_error: str | None) -> str:
    """A short, stable refusal reason for a failed handshake or peer check."""
    if verify_error is not None:
        return verify_error
    detail = exc.detail.lower()
    if exc.reason.value != "handshake-failed":
        return exc.reason.value
    if "unsupported protocol" in detail or "version too low" in detail:
        return "not-tls13"  # TLS 1.2 or older offered
    if any(s in detail for s in _NOT_TLS):
        return "not-tls"
    if "did not return a certificate" in detail or "peer did not return" in detail:
        return "no-certificate"
    if "certificate" in detail:
        return "untrusted"
    if "key share" in detail or "shared group" in detail or "no suitable" in detail:
        return "not-post-quantum"
    if "eof" in detail or "reset" in detail or "unexpected" in detail:
        return "handshake-aborted"
    return "handshake-failed"


def refused(direction: str, reason: str, **fields: Any) -> None:
    """Log and count one refusal."""
    REFUSALS.labels(direction, reason).inc()
    log_event(log, "tunnel-refused", level=logging.WARNING, direction=direction, reason=reason, **fields)


def mux_connection(direction: str, what: str, **fields: Any) -> None:
    """Log a mux connection opening or closing (``mux-opened`` / ``mux-closed``; streams log on their own)."""
    log_event(log, f"mux-{what}", direction=direction, **fields)


def finished(direction: str, result: RelayResult, **fields: Any) -> None:
    """Log and count one finished tunnel."""
    TUNNELS.labels(direction, result.reason.value).inc()
    sent, received = (result.plain_to_tls, result.tls_to_plain)
    BYTES.labels(direction, "to-peer").inc(sent)
    BYTES.labels(direction, "from-peer").inc(received)
    log_event(
        log,
        "tunnel-closed",
        direction=direction,
        bytes_to_peer=sent,
        bytes_from_peer=received,
        duration=round(result.duration, 3),
        end=result.reason.value,
        end_side=result.side.value if result.side else None,
        end_detail=result.detail or None,
        **fields,
    )
