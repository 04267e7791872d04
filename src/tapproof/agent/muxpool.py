"""The client side of multiplexing: per peer host, a small pool of long-lived mux connections.

:func:`tapproof.agent.outbound.open_tunnel` hands an application connection
here when ``--mux`` is on. Per peer host up to :data:`POOL_SIZE` connections
(two: one event-loop thread each, so both cores can run TLS), opened on
demand with the same context, group requirement and peer check as a classic
tunnel plus the ALPN offer ``tapproof-mux/1``. A peer agent that does not
select it is remembered for :data:`NO_MUX_RETRY` seconds and gets classic
tunnels (no downgrade: same TLS, same checks). A new stream goes to the
connection with the fewest streams; a second connection is opened once the
first is busy. Connections made under older credentials (renewal, rotation,
bundle change), whose peer certificate expired, or that got a GOAWAY are
retired: no new streams, GOAWAY, closed once their streams ended. An idle
connection closes after :data:`IDLE_CLOSE` seconds. A revoked peer's
connections are closed by the tunnel table, every stream reset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import socket
import struct
import threading
import time
from typing import Any

from tapproof.agent import events
from tapproof.agent.credstore import Material
from tapproof.agent.metrics import HANDSHAKE_SECONDS, HANDSHAKES, MUX_CONNECTIONS, MUX_STREAMS
from tapproof.agent.muxstreams import StreamLog, next_mux_id
from tapproof.agent.peerdial import CONNECT_TIMEOUT, DialRefused, dial_peer
from tapproof.agent.runtime import Runtime
from tapproof.agent.tunnels import MuxPeer
from tapproof.identity import host_id
from tapproof.logs import log_event
from tapproof.tls.context import MUX_ALPN
from tapproof.tls.stream import TLSStream
from tapproof.tunnel.muxloop import MuxLoop, run_in_thread
from tapproof.units import format_hostport

log = logging.getLogger(__name__)

__all__ = ["IDLE_CLOSE", "NO_MUX_RETRY", "POOL_SIZE", "MuxPool"]

POOL_SIZE = 2
IDLE_CLOSE = 30.0
NO_MUX_RETRY = 300.0
GROW_RETRY = 5.0
"""Seconds after a failed background dial before the next one (no dial per accepted connection)."""
DIRECTION = "outbound"


@dataclasses.dataclass(eq=False)
class _Client:
    loop: MuxLoop
    material: Material
    serial: str
    not_after: dt.datetime
    mux_id: int
    fields: dict[str, Any]
    pending: int = 0
    closed: bool = False

    @property
    def load(self) -> int:
        return self.loop.stream_count + self.pending


@dataclasses.dataclass
class _Peer:
    conns: list[_Client] = dataclasses.field(default_factory=list)
    connecting: int = 0
    no_mux_until: float = 0.0
    grow_after: float = 0.0  # a background dial failed: none before this (monotonic)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class MuxPool:
    """Mux connections per peer host (thread-safe); see the module doc."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._peers: dict[str, _Peer] = {}

    def open(
        self, rt: Runtime, app: socket.socket, host: str, target: str, source: str | None, fields: dict[str, Any]
    ) -> bool:
        """Carry ``app`` as a stream to ``target`` on ``host``; False: the peer has no mux, use a classic tunnel.

        True means ``app`` was taken (carried, or reset with a logged refusal).
        """
        material = rt.creds.current
        deadline = time.monotonic() + CONNECT_TIMEOUT
        with self._lock:
            peer = self._peers.setdefault(host, _Peer())
            while True:
                now = time.monotonic()
                if peer.no_mux_until > now:
                    return False
                self._retire(rt, peer, material)
                best = min(peer.conns, key=lambda c: c.load, default=None)
                room = len(peer.conns) + peer.connecting < self.size
                if best is not None and (best.load == 0 or not room):
                    return self._submit(rt, best, app, host, target, source, fields)
                if room:
                    peer.connecting += 1
                    break
                if now >= deadline:  # every slot is connecting for too long
                    _reset(app)
                    events.refused(DIRECTION, "connect-failed", detail="mux connections not ready", **fields)
                    return True
                self._changed.wait(deadline - now)
        client: _Client | None = None
        try:
            client = self._connect(rt, host, material, fields)
        except DialRefused as exc:
            with self._lock:
                peer.connecting -= 1
                self._changed.notify_all()
            _reset(app)
            events.refused(DIRECTION, exc.reason, detail=exc.detail, **fields)
            return True
        with self._lock:
            peer.connecting -= 1
            self._changed.notify_all()
            if client is None:
                peer.no_mux_until = time.monotonic() + NO_MUX_RETRY
                return False
            peer.conns.append(client)
            return self._submit(rt, client, app, host, target, source, fields)

    def try_open(
        self, rt: Runtime, app: socket.socket, host: str, target: str, source: str | None, fields: dict[str, Any]
    ) -> bool:
        """Like :meth:`open` but never waits: False unless a live connection to ``host`` takes ``app``.

        When every connection is busy and the pool has room, another one is
        dialled in the background (this stream still goes to the least loaded).
        """
        material = rt.creds.current
        with self._lock:
            peer = self._peers.get(host)
            if peer is None or peer.no_mux_until > time.monotonic():
                return False
            self._retire(rt, peer, material)
            best = min(peer.conns, key=lambda c: c.load, default=None)
            if best is None:
                return False
            now = time.monotonic()
            if best.load > 0 and len(peer.conns) + peer.connecting < self.size and now >= peer.grow_after:
                peer.connecting += 1
                threading.Thread(
                    target=self._grow, args=(rt, host, material, fields), name=f"mux-dial-{host}", daemon=True
                ).start()
            return self._submit(rt, best, app, host, target, source, fields)

    def _grow(self, rt: Runtime, host: str, material: Material, fields: dict[str, Any]) -> None:
        """(own thread) One more pooled connection to ``host``; a failure is logged, the next open retries."""
        client: _Client | None = None
        failed: DialRefused | None = None
        try:
            client = self._connect(rt, host, material, fields)
        except DialRefused as exc:
            failed = exc
        with self._lock:
            peer = self._peers.setdefault(host, _Peer())
            peer.connecting -= 1
            self._changed.notify_all()
            if client is not None:
                peer.conns.append(client)
            elif failed is None:
                peer.no_mux_until = time.monotonic() + NO_MUX_RETRY
            else:
                peer.grow_after = time.monotonic() + GROW_RETRY
        if failed is not None:
            log_event(
                log,
                "mux-connect-failed",
                level=logging.WARNING,
                reason=failed.reason,
                detail=failed.detail,
                **{k: v for k, v in fields.items() if k in ("peer", "address")},
            )

    def _retire(self, rt: Runtime, peer: _Peer, material: Material) -> None:
        now = rt.now()
        for c in list(peer.conns):
            if c.closed or c.material is not material or now >= c.not_after or not c.loop.mux.can_open():
                peer.conns.remove(c)
                if not c.closed:
                    c.loop.goaway()

    def _submit(
        self,
        rt: Runtime,
        client: _Client,
        app: socket.socket,
        host: str,
        target: str,
        source: str | None,
        fields: dict[str, Any],
    ) -> bool:
        """(pool lock held) Hand ``app`` to ``client``'s loop.

        A connection that already ended (its ``after`` set ``closed`` under this lock
        and then ran what was queued) never gets a stream: the queue is no longer
        drained, so the application would hang instead of being reset. This happens
        when a fresh connection dies before ``open`` adds it to the pool.
        """
        fields = {**fields, **client.fields}
        if client.closed:
            _reset(app)
            MUX_STREAMS.labels(DIRECTION, "refused").inc()
            events.refused(DIRECTION, "mux-unavailable", detail="mux connection ended before use", **fields)
            return True
        hooks = StreamLog(rt.tunnels, DIRECTION, host, client.serial, target, fields)
        if rt.policy.is_revoked(client.serial, host):
            client.loop.stop()
            client.closed = True
            _reset(app)
            MUX_STREAMS.labels(DIRECTION, "refused").inc()
            events.refused(DIRECTION, "revoked", **fields)
            return True
        client.pending += 1

        def start() -> None:
            with self._lock:
                client.pending -= 1
            client.loop.open_stream(app, target, source, hooks)

        client.loop.submit(start)
        return True

    def _connect(self, rt: Runtime, host: str, material: Material, fields: dict[str, Any]) -> _Client | None:
        """A new mux connection to ``host``, loop started; None if the peer did not select mux ALPN."""
        start = time.monotonic()
        addr = rt.registry.advertise(host)
        if addr is None:
            raise DialRefused("unknown-host", "")
        dialed = dial_peer(rt, host, addr, material, prepare=lambda conn: conn.set_alpn_protos([MUX_ALPN]))
        stream, leaf, serial = dialed.stream, dialed.leaf, dialed.serial
        HANDSHAKE_SECONDS.labels(DIRECTION).observe(time.monotonic() - start)
        HANDSHAKES.labels(DIRECTION, "full").inc()
        if stream.conn.get_alpn_proto_negotiated() != MUX_ALPN:
            stream.close(time.monotonic() + 1.0)
            log.info("peer %s does not multiplex: classic tunnels for %ss", host, NO_MUX_RETRY)
            return None
        return self._start(rt, host, addr, stream, material, serial, leaf.not_valid_after_utc if leaf else rt.now())

    def _start(
        self,
        rt: Runtime,
        host: str,
        addr: tuple[str, int],
        stream: TLSStream,
        material: Material,
        serial: str,
        not_after: dt.datetime,
    ) -> _Client:
        mux_id = next_mux_id()
        conn_fields: dict[str, Any] = {"group": stream.group, "resumed": False, "mux": mux_id}
        holder: list[_Client] = []

        def on_idle(_loop: MuxLoop) -> bool:
            with self._lock:
                c = holder[0]
                if c.pending or c.loop.stream_count:
                    return False
                peer = self._peers.get(host)
                if peer is not None and c in peer.conns:
                    peer.conns.remove(c)
                c.closed = True
                return True

        loop = MuxLoop(stream.conn, client=True, idle_timeout=rt.config.idle_timeout, client_idle_close=IDLE_CLOSE)
        loop._on_idle = on_idle
        client = _Client(loop, material, serial, not_after, mux_id, conn_fields)
        holder.append(client)
        entry = MuxPeer(DIRECTION, host, serial, loop, loop.goaway)
        rt.tunnels.add_mux(entry)
        MUX_CONNECTIONS.labels(DIRECTION).inc()
        peer_fields = {"peer": str(host_id(rt.trust_domain, host)), "address": format_hostport(*addr)}
        events.mux_connection(DIRECTION, "opened", **peer_fields, **conn_fields)

        def after(done: MuxLoop) -> None:
            with self._lock:
                client.closed = True
                peer = self._peers.get(host)
                if peer is not None and client in peer.conns:
                    peer.conns.remove(client)
                self._changed.notify_all()
            done.drain_queue()  # opens handed in meanwhile refuse themselves (the loop is dead)
            rt.tunnels.remove_mux(entry)
            MUX_CONNECTIONS.labels(DIRECTION).dec()
            reason, detail = done.end or (None, "")
            events.mux_connection(
                DIRECTION,
                "closed",
                end=reason.value if reason else None,
                end_detail=detail,
                streams=done.opened,
                **peer_fields,
                **conn_fields,
            )

        run_in_thread(loop, f"mux-{host}-{mux_id}", after)
        return client
