"""A mux connection that ended before the pool used it never takes a stream (the app is reset, not left hanging)."""

from __future__ import annotations

import socket
import types
from typing import Any, cast

from tapproof.agent import muxpool


def test_a_closed_connection_resets_the_application_instead_of_queueing_it() -> None:
    app, peer = socket.socketpair()
    submitted: list[Any] = []
    loop = types.SimpleNamespace(submit=submitted.append)
    client = types.SimpleNamespace(closed=True, fields={"mux": 7}, loop=loop, pending=0, serial="ab")
    pool = muxpool.MuxPool()
    before = muxpool.MUX_STREAMS.labels(muxpool.DIRECTION, "refused")._value.get()
    taken = pool._submit(cast("Any", None), cast("Any", client), app, "b", "echo", None, {"peer": "x"})
    assert taken
    assert submitted == []  # nothing handed to a loop that will never run it
    assert client.pending == 0
    assert muxpool.MUX_STREAMS.labels(muxpool.DIRECTION, "refused")._value.get() == before + 1
    peer.settimeout(5)
    try:
        data = peer.recv(1)
    except ConnectionResetError:
        data = None
    assert app.fileno() == -1  # the pool closed the application's socket
    assert data in (None, b"")
    peer.close()
