"""Transparent mode, inbound: plaintext that arrives from the network on a protected port.

In ``--transparent`` mode the PREROUTING rules (:mod:`tapproof.agent.transparent`)
redirect every inbound TCP connection to a *protected port* (the port of each
``--service`` TCP target on loopback, plus each ``--protected-port``) into this
listener. Tunnels never come here: they arrive on the tunnel port, which
:func:`tapproof.agent.config.check` forbids as a protected port.

For each connection, after reading the original destination (``SO_ORIGINAL_DST``):

* anything not redirected to a protected port on one of this host's own
  addresses (a direct connection to the inbound port, routed traffic) is
  reset: reason ``not-redirected`` (``no-original-destination`` when the
  socket has none);
* ``--mode strict``: reset (RST, not a clean EOF), one ``plaintext-refused``
  log line (source, original destination, reason ``plaintext-in-strict-mode``)
  and ``tapproof_agent_refusals_total{direction="inbound",reason="plaintext-in-strict-mode"}``;
* ``--mode permissive``: connect to the local service on that port (the
  ``--service`` target fronting it, else ``127.0.0.1:PORT``), one
  ``plaintext-accepted`` line, count it in
  ``tapproof_agent_plaintext_inbound_total{source}`` and relay plainly, both
  directions, half-close respected. This is how a fleet rolls out: run
  permissive, watch the counter until the only sources left are agents, then
  switch to strict (SIGHUP re-reads ``mode``; the next connection obeys it).

Label cardinality is bounded: the first :data:`MAX_SOURCES` distinct source
addresses get their own label, later ones are counted as ``other``.

The listener is bound on the wildcard address, not loopback: ``REDIRECT`` in
PREROUTING rewrites the destination to the *receiving interface's* primary
address, which a socket bound to 127.0.0.1 never matches. It is not an open
relay: only connections whose original destination is a protected port of this
host are ever forwarded, and only to that same port on loopback, which the
client could reach directly in permissive mode anyway.

The relay is deliberately simple (this path carries legacy plaintext during a
rollout, not the fleet's tunnels): two threads per connection, ``recv_into``
/ ``sendall`` on 256 KiB buffers, no per-byte Python work.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter

from tapproof.agent.config import Service, is_loopback
from tapproof.agent.inbound import connect_service, is_own_address
from tapproof.agent.metrics import REFUSALS
from tapproof.agent.runtime import Runtime
from tapproof.logs import log_event
from tapproof.units import format_hostport

log = logging.getLogger("tapproof.agent.plaintext")

__all__ = ["MAX_SOURCES", "PLAINTEXT_INBOUND", "PlainInbound", "relay_plain"]

DIRECTION = "inbound"
MAX_SOURCES = 256
"""Distinct ``source`` label values before further sources are counted as ``other``."""
OTHER = "other"
BUFFER = 256 * 1024

PLAINTEXT_INBOUND = Counter(
    "tapproof_agent_plaintext_inbound",
    "Plaintext inbound connections to protected ports forwarded in permissive mode, by source address",
    ["source"],
)

OriginalDst = Callable[[socket.socket], tuple[str, int]]


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the client sees a reset, never a clean empty answer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Sources:
    """Per-source counts with a bounded label set (thread-safe)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def count(self, source_ip: str) -> str:
        """Count one connection from ``source_ip``; return the label it was counted under."""
        with self._lock:
            label = source_ip
            if label not in self._counts and sum(1 for k in self._counts if k != OTHER) >= self.limit:
                label = OTHER
            self._counts[label] = self._counts.get(label, 0) + 1
        PLAINTEXT_INBOUND.labels(label).inc()
        return label

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def _pump(src: socket.socket, dst: socket.socket, counter: list[int], failed: threading.Event) -> None:
    """Copy ``src`` to ``dst`` until EOF (then half-close ``dst``) or an error (then wake the other pump)."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if n == 0:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(view[:n])
            counter[0] += n
    except OSError:
        failed.set()
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def relay_plain(a: socket.socket, b: socket.socket) -> tuple[int, int, bool]:
    """Relay ``a`` <-> ``b`` until both directions ended; close both.

    Returns (bytes a->b, bytes b->a, clean). On an error both sockets are
    shut down and ``a`` is reset, so its client never takes a cut stream for
    a complete one.
    """
    a_to_b, b_to_a = [0], [0]
    failed = threading.Event()
    other = threading.Thread(target=_pump, args=(b, a, b_to_a, failed), name="plain-relay", daemon=True)
    try:
        other.start()
    except RuntimeError:  # no thread to spare: end this connection, not the agent
        _reset(a)
        b.close()
        return 0, 0, False
    _pump(a, b, a_to_b, failed)
    other.join()
    clean = not failed.is_set()
    if clean:
        a.close()
    else:
        _reset(a)
    b.close()
    return a_to_b[0], b_to_a[0], clean


class PlainInbound:
    """Handler of the plaintext inbound listener (one call per redirected connection, own thread)."""

    def __init__(
        self,
        rt: Runtime,
        protected_ports: Iterable[int],
        original_dst: OriginalDst,
        *,
        max_sources: int = MAX_SOURCES,
        own_address: Callable[[str], bool] = is_own_address,
    ) -> None:
        self.rt = rt
        self.protected_ports = tuple(sorted(set(protected_ports)))
        self.original_dst = original_dst
        self.own_address = own_address
        self.sources = _Sources(max_sources)
        self._lock = threading.Lock()
        self.refused: dict[str, int] = {}
        self.accepted = 0
        self.active = 0

    def __call__(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        """Refuse or forward one connection; owns ``conn``."""
        source_ip = str(addr[0])
        fields: dict[str, Any] = {"source": format_hostport(source_ip, int(addr[1]))}
        try:
            dst_ip, dst_port = self.original_dst(conn)
        except OSError as exc:
            self._refuse(conn, "no-original-destination", detail=str(exc), **fields)
            return
        fields["original_dst"] = format_hostport(dst_ip, dst_port)
        if dst_port not in self.protected_ports or not self.own_address(dst_ip):
            self._refuse(conn, "not-redirected", **fields)
            return
        cfg = self.rt.config  # read per connection: SIGHUP may switch the mode
        if cfg.mode != "permissive":
            self._refuse(conn, "plaintext-in-strict-mode", mode=cfg.mode, **fields)
            return
        svc = self._service(dst_port)
        fields["service"] = svc.name if svc is not None else f"port-{dst_port}"
        try:
            service_sock = connect_service(svc, None if svc is not None else ("127.0.0.1", dst_port))
        except OSError as exc:
            self._refuse(conn, "service-unreachable", detail=exc.strerror or str(exc), **fields)
            return
        label = self.sources.count(source_ip)
        with self._lock:
            self.accepted += 1
            self.active += 1
        log_event(
            log, "plaintext-accepted", level=logging.WARNING, direction=DIRECTION, mode=cfg.mode, label=label, **fields
        )
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        try:
            sent, received, clean = relay_plain(conn, service_sock)
        finally:
            with self._lock:
                self.active -= 1
        log_event(
            log,
            "plaintext-closed",
            direction=DIRECTION,
            bytes_to_service=sent,
            bytes_from_service=received,
            duration=round(time.monotonic() - start, 3),
            clean=clean,
            **fields,
        )

    def _service(self, port: int) -> Service | None:
        """The fronted TCP loopback service on ``port``, if any."""
        for s in self.rt.config.services:
            if not s.unix_path and s.port == port and is_loopback(s.host):
                return s
        return None

    def _refuse(self, conn: socket.socket, reason: str, **fields: Any) -> None:
        _reset(conn)
        REFUSALS.labels(DIRECTION, reason).inc()
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        log_event(log, "plaintext-refused", level=logging.WARNING, direction=DIRECTION, reason=reason, **fields)

    def status(self) -> dict[str, Any]:
        """The plaintext counts for ``/status``."""
        with self._lock:
            refused = dict(self.refused)
            accepted, active = self.accepted, self.active
        return {"accepted": accepted, "active": active, "refused": refused, "by_source": self.sources.snapshot()}
