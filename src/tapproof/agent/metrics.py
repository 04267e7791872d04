"""The agent's Prometheus metrics (one process, the default registry)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BYTES",
    "CA_EXPIRY",
    "CA_WARNING",
    "CERT_EXPIRY",
    "CONTROL_PLANE_UP",
    "HANDSHAKES",
    "HANDSHAKE_SECONDS",
    "MUX_CONNECTIONS",
    "MUX_STREAMS",
    "MUX_STREAMS_ACTIVE",
    "REFUSALS",
    "RENEWALS",
    "TUNNELS",
    "TUNNELS_ACTIVE",
    "UNSAFE_CLASSICAL_GROUPS",
    "refused",
]

REFUSALS = Counter(
    "tapproof_agent_refusals", "Connections refused, by reason (inbound and outbound)", ["direction", "reason"]
)
TUNNELS = Counter("tapproof_agent_tunnels", "Tunnels finished, by direction and end reason", ["direction", "end"])
TUNNELS_ACTIVE = Gauge("tapproof_agent_tunnels_active", "Tunnels relaying right now", ["direction"])
BYTES = Counter("tapproof_agent_bytes", "Application bytes relayed", ["direction", "way"])
HANDSHAKE_SECONDS = Histogram(
    "tapproof_agent_handshake_seconds",
    "TLS handshake plus peer check time",
    ["direction"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
HANDSHAKES = Counter(
    "tapproof_agent_handshakes",
    "Completed tunnel handshakes (peer checked), by direction and kind (full, resumed)",
    ["direction", "kind"],
)
MUX_CONNECTIONS = Gauge("tapproof_agent_mux_connections", "Mux connections open, by direction", ["direction"])
MUX_STREAMS = Counter(
    "tapproof_agent_mux_streams", "Mux streams by direction and result (opened, refused)", ["direction", "result"]
)
MUX_STREAMS_ACTIVE = Gauge("tapproof_agent_mux_streams_active", "Mux streams relaying right now", ["direction"])
CONTROL_PLANE_UP = Gauge("tapproof_agent_control_plane_up", "1 when the last control-plane call succeeded")
CERT_EXPIRY = Gauge("tapproof_agent_certificate_expiry_seconds", "Seconds until this agent's certificate expires")
UNSAFE_CLASSICAL_GROUPS = Gauge(
    "tapproof_agent_unsafe_classical_groups", "1 when --unsafe-classical-groups lets classical key exchange in"
)
CA_EXPIRY = Gauge(
    "tapproof_agent_ca_expiry_seconds",
    "Seconds until expiry: leaf, intermediates, roots of the bundle",
    ["kind", "cert"],
)
CA_WARNING = Gauge(
    "tapproof_agent_ca_expiry_warning", "1 when the expiry warning threshold is crossed", ["kind", "cert"]
)
RENEWALS = Counter("tapproof_agent_renewals", "Certificate renewals, by result", ["result"])


def refused(direction: str) -> Callable[[str], None]:
    """A callback counting a listener's refusals (``too-many-connections``, ...) for ``direction``."""
    return lambda reason: REFUSALS.labels(direction, reason).inc()
