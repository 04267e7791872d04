"""The server side of a mux connection: every OPEN checked like a classic CONNECT, then a stream.

Called by :class:`tapproof.agent.inbound.InboundHandler` after the handshake
and peer check, when the client negotiated ALPN ``tapproof-mux/1``; runs the
connection's event loop (:mod:`tapproof.tunnel.muxloop`) in the handler's
thread until the connection ends. For each OPEN, in this order (fail closed):

1. the connection's peer is re-checked: its serial or host revoked since the
   handshake -> ``403`` (``peer-revoked``) and the whole connection is closed,
   every stream reset; its certificate expired -> ``403`` (``expired``) and
   GOAWAY (the client reconnects with a full handshake);
2. :func:`tapproof.agent.inbound.check_target`: address-target rules, policy
   before existence, as for a classic CONNECT (same reasons);
3. a non-blocking connect to the service (``502`` ``service-unreachable`` on
   failure or after 5 s), then ``200`` and the stream relays.

When this agent's credentials or bundle change, the connection is told to
GOAWAY at its next OPEN (that stream is still served), so new streams move to
a connection handshaken under the new generation.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable
from typing import Any

from tapproof.agent import events
from tapproof.agent.credstore import Material
from tapproof.agent.metrics import MUX_CONNECTIONS, MUX_STREAMS
from tapproof.agent.muxstreams import StreamLog, next_mux_id
from tapproof.agent.runtime import Runtime
from tapproof.agent.tunnels import MuxPeer
from tapproof.identity import SpiffeID
from tapproof.tls.stream import TLSStream
from tapproof.tunnel import preamble
from tapproof.tunnel.muxloop import MuxLoop, OpenRefused, StreamHooks

__all__ = ["serve"]

DIRECTION = "inbound"


class _Server:
    def __init__(
        self,
        rt: Runtime,
        peer: SpiffeID,
        serial: str,
        not_after: dt.datetime,
        material: Material,
        fields: dict[str, Any],
        check: Callable[[Runtime, SpiffeID, preamble.Target], Any],
    ) -> None:
        self.rt = rt
        self.peer = peer
        self.serial = serial
        self.not_after = not_after
        self.material = material
        self.fields = fields
        self.check = check
        self.loop: MuxLoop | None = None

    def on_open(
        self, target: preamble.Target, source: str | None
    ) -> OpenRefused | tuple[socket.socket, Any, StreamHooks]:
        rt, loop = self.rt, self.loop
        assert loop is not None  # noqa: S101 - set before the loop runs
        fields = {**self.fields, "target": str(target), "app_source": source}

        def refuse(status: int, reason: str, **extra: object) -> OpenRefused:
            MUX_STREAMS.labels(DIRECTION, "refused").inc()
            events.refused(DIRECTION, reason, status=status, **{"service": str(target), **fields, **extra})
            return OpenRefused(status)

        if rt.policy.is_revoked(self.serial, self.peer.name):
            loop.stop()
            return refuse(403, "peer-revoked")
        if rt.now() >= self.not_after:
            loop.goaway()
            return refuse(403, "expired")
        if rt.creds.current is not self.material:
            loop.goaway()
        verdict = self.check(rt, self.peer, target)
        fields["service"] = verdict.name
        if verdict.refusal is not None:
            status, reason, extra = verdict.refusal
            MUX_STREAMS.labels(DIRECTION, "refused").inc()
            events.refused(DIRECTION, reason, status=status, **fields, **extra)
            return OpenRefused(status)
        svc = verdict.svc
        try:
            if svc is not None and svc.unix_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                addr: Any = svc.unix_path
            else:
                host, port = (svc.host, svc.port) if svc is not None else verdict.port_target
                family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                sock = socket.socket(family, type_, proto)
        except OSError as exc:
            return refuse(502, "service-unreachable", detail=exc.strerror or str(exc))
        sock.setblocking(False)
        hooks = StreamLog(rt.tunnels, DIRECTION, self.peer.name, self.serial, verdict.name, fields)
        return sock, addr, hooks


def serve(
    rt: Runtime,
    stream: TLSStream,
    peer: SpiffeID,
    serial: str,
    not_after: dt.datetime,
    material: Material,
    source: str,
    check: Callable[[Runtime, SpiffeID, preamble.Target], Any],
) -> None:
    """Serve one handshaken, peer-checked mux connection until it ends (in the caller's thread)."""
    mux_id = next_mux_id()
    fields: dict[str, Any] = {"peer": str(peer), "source": source, "group": stream.group, "mux": mux_id}
    server = _Server(rt, peer, serial, not_after, material, fields, check)
    loop = MuxLoop(stream.conn, client=False, server_hooks=server, idle_timeout=rt.config.idle_timeout)
    server.loop = loop
    entry = MuxPeer(DIRECTION, peer.name, serial, loop, loop.goaway)
    rt.tunnels.add_mux(entry)
    if rt.policy.is_revoked(serial, peer.name):  # revoked between the peer check and registration
        loop.stop()
    MUX_CONNECTIONS.labels(DIRECTION).inc()
    events.mux_connection(DIRECTION, "opened", **fields)
    try:
        reason, detail = loop.run()
    finally:
        rt.tunnels.remove_mux(entry)
        MUX_CONNECTIONS.labels(DIRECTION).dec()
    events.mux_connection(DIRECTION, "closed", end=reason.value, end_detail=detail, streams=loop.opened, **fields)
