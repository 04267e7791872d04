"""Tunnel sockets carry TCP keepalive and TCP_USER_TIMEOUT (a silent partition is found in bounded time)."""

from __future__ import annotations

import socket

from tapproof.tls import stream


def test_set_liveness_sets_the_kernel_options() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as c:
        stream.set_liveness(c)
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == stream.KEEPALIVE_IDLE
        assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == stream.KEEPALIVE_INTERVAL
        assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == stream.USER_TIMEOUT * 1000
        # the bound holds for an idle socket too: the first probe comes well before the user timeout
        assert stream.KEEPALIVE_IDLE + stream.KEEPALIVE_INTERVAL <= stream.USER_TIMEOUT
