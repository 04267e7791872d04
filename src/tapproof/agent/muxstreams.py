"""Per-stream bookkeeping shared by both ends of a mux connection: table, metrics, log lines.

Each open stream is a :class:`~tapproof.agent.tunnels.Tunnel` of its own in the
tunnel table (so ``/status``, drain and revocation see it as today), counted
in ``tapproof_agent_tunnels_active`` and ``tapproof_agent_mux_streams_*``, and
logged with the same ``tunnel-refused`` / ``tunnel-closed`` lines and reasons
as a classic tunnel, plus a ``mux`` field naming its connection.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from tapproof.agent import events
from tapproof.agent.metrics import MUX_STREAMS, MUX_STREAMS_ACTIVE, TUNNELS_ACTIVE
from tapproof.agent.tunnels import Tunnel, TunnelTable
from tapproof.tunnel.relay import RelayResult

__all__ = ["StreamLog", "next_mux_id"]

_ids = itertools.count(1)


def next_mux_id() -> int:
    """A process-unique number for a mux connection (the ``mux`` log field)."""
    return next(_ids)


class _Stop:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def stop(self) -> None:
        self.fn()


class StreamLog:
    """The :class:`~tapproof.tunnel.muxloop.StreamHooks` of one stream (called in the loop thread)."""

    __slots__ = ("direction", "fields", "peer_host", "serial", "service", "start", "table", "tunnel")

    def __init__(
        self, table: TunnelTable, direction: str, peer_host: str, serial: str, service: str, fields: dict[str, Any]
    ) -> None:
        self.table = table
        self.direction = direction
        self.peer_host = peer_host
        self.serial = serial
        self.service = service
        self.fields = fields
        self.start = time.monotonic()
        self.tunnel: Tunnel | None = None

    def accepted(self, stop: Callable[[], None]) -> None:
        """Register the open stream (revocation and drain reach it through ``stop``)."""
        self.tunnel = self.table.add(self.direction, self.peer_host, self.serial, self.service, _Stop(stop))
        TUNNELS_ACTIVE.labels(self.direction).inc()
        MUX_STREAMS_ACTIVE.labels(self.direction).inc()
        MUX_STREAMS.labels(self.direction, "opened").inc()

    def refused(self, reason: str, status: int | None, detail: str) -> None:
        """Log and count a stream that never opened."""
        MUX_STREAMS.labels(self.direction, "refused").inc()
        extra: dict[str, Any] = {"status": status} if status is not None else {}
        if detail:
            extra["detail"] = detail
        events.refused(self.direction, reason, **self.fields, **extra)

    def ended(self, result: RelayResult) -> None:
        """Log and count an open stream's end."""
        if self.tunnel is not None:
            self.table.remove(self.tunnel)
            TUNNELS_ACTIVE.labels(self.direction).dec()
            MUX_STREAMS_ACTIVE.labels(self.direction).dec()
        setup = round(time.monotonic() - self.start - result.duration, 4)
        events.finished(self.direction, result, setup=setup, **self.fields)
