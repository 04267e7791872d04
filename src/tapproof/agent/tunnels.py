"""The table of live tunnels: for revocation, draining, and /status.

Each tunnel registers its :class:`~tapproof.tunnel.relay.Relay` with the peer
agent's host name and certificate serial. When a revocation arrives,
:meth:`TunnelTable.close_revoked` stops every tunnel whose peer is now revoked
(the relay aborts both sockets with an RST at once).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Collection
from typing import Protocol

from tapproof.agent.metrics import TUNNELS_ACTIVE
from tapproof.tunnel.relay import Relay, RelayResult

__all__ = ["MuxPeer", "Stoppable", "Tunnel", "TunnelTable"]


class Stoppable(Protocol):
    """What the table stops: a relay, a mux stream or a mux connection."""

    def stop(self) -> None:
        """Abort (an RST for every application connection involved)."""


@dataclasses.dataclass(eq=False)
class MuxPeer:
    """One live mux connection (its streams are :class:`Tunnel` entries of their own)."""

    direction: str
    peer_host: str
    peer_serial: str
    conn: Stoppable
    goaway: Callable[[], None]


@dataclasses.dataclass(eq=False)
class Tunnel:
    """One live tunnel."""

    tunnel_id: int
    direction: str  # "inbound" | "outbound"
    peer_host: str
    peer_serial: str
    service: str
    relay: Stoppable
    started: float = dataclasses.field(default_factory=time.monotonic)


class TunnelTable:
    """Thread-safe set of live tunnels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tunnels: dict[int, Tunnel] = {}
        self._ids = itertools.count(1)
        self._idle = threading.Condition(self._lock)
        self._muxes: dict[int, MuxPeer] = {}

    def add_mux(self, peer: MuxPeer) -> None:
        """Register a live mux connection (closed by :meth:`close_revoked` and :meth:`stop_all`)."""
        with self._lock:
            self._muxes[id(peer)] = peer

    def remove_mux(self, peer: MuxPeer) -> None:
        """Forget an ended mux connection."""
        with self._lock:
            self._muxes.pop(id(peer), None)

    def muxes(self) -> list[MuxPeer]:
        """The live mux connections."""
        with self._lock:
            return list(self._muxes.values())

    def goaway_all(self) -> None:
        """Ask every mux connection to drain (agent stopping): no new streams, live ones continue."""
        for m in self.muxes():
            m.goaway()

    def add(self, direction: str, peer_host: str, peer_serial: str, service: str, relay: Stoppable) -> Tunnel:
        """Register a tunnel about to run."""
        with self._lock:
            t = Tunnel(next(self._ids), direction, peer_host, peer_serial.lower(), service, relay)
            self._tunnels[t.tunnel_id] = t
            return t

    def run(
        self,
        direction: str,
        peer_host: str,
        peer_serial: str,
        service: str,
        relay: Relay,
        *,
        revoked: Callable[[], bool],
    ) -> RelayResult:
        """Run ``relay`` registered in the table (revocation, drain, /status), then forget it.

        ``revoked`` is asked once the tunnel is registered: a revocation that
        arrived between the peer check and now stops the relay at once.
        """
        tunnel = self.add(direction, peer_host, peer_serial, service, relay)
        if revoked():
            relay.stop()
        TUNNELS_ACTIVE.labels(direction).inc()
        try:
            return relay.run()
        finally:
            TUNNELS_ACTIVE.labels(direction).dec()
            self.remove(tunnel)

    def remove(self, tunnel: Tunnel) -> None:
        """Forget a finished tunnel."""
        with self._lock:
            self._tunnels.pop(tunnel.tunnel_id, None)
            if not self._tunnels:
                self._idle.notify_all()

    def live(self) -> list[Tunnel]:
        """The live tunnels."""
        with self._lock:
            return list(self._tunnels.values())

    def close_revoked(self, serials: Collection[str], hosts: Collection[str]) -> list[Tunnel]:
        """Stop every tunnel whose peer serial or host is revoked; return them."""
        hit = [t for t in self.live() if t.peer_serial in serials or t.peer_host in hosts]
        for t in hit:
            t.relay.stop()
        for m in self.muxes():  # the connection too (every stream reset): no new stream over it either
            if m.peer_serial.lower() in serials or m.peer_host in hosts:
                m.conn.stop()
        return hit

    def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every tunnel to end; True if none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._tunnels:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def stop_all(self) -> int:
        """Abort every live tunnel; return how many."""
        live = self.live()
        for t in live:
            t.relay.stop()
        for m in self.muxes():
            m.conn.stop()
        return len(live)
