"""Listener refusals (``too-many-connections``): counted, and logged as rate-limited structured lines."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from tapproof import listener as listener_mod
from tapproof.listener import Listener, bind


def test_refusals_are_logged_rate_limited_with_a_suppressed_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener_mod, "LOG_EVERY", 0.5)
    release = threading.Event()
    refused: list[str] = []

    def handler(conn: socket.socket, _addr: tuple[str, int]) -> None:
        release.wait(10)
        conn.close()

    lst = Listener(bind("127.0.0.1", 0, what="test"), handler, name="t", on_refuse=refused.append, max_workers=1)
    lst.start()
    port = int(lst.sock.getsockname()[1])
    held = socket.create_connection(("127.0.0.1", port))
    caplog.set_level(logging.WARNING, logger="tapproof.listener")
    try:
        time.sleep(0.2)  # the one worker is busy with `held`
        for _ in range(5):
            socket.create_connection(("127.0.0.1", port)).close()
        deadline = time.monotonic() + 5
        while len(refused) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.6)  # past LOG_EVERY: the next refusal is logged with the count of the silent ones
        socket.create_connection(("127.0.0.1", port)).close()
        while len(refused) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        release.set()
        held.close()
        lst.stop()
    assert refused == ["too-many-connections"] * 6
    lines = [r for r in caplog.records if getattr(r, "event", "") == "connection-refused"]
    assert len(lines) == 2, [r.__dict__ for r in lines]
    fields = [{k: getattr(r, k, None) for k in ("reason", "listener", "suppressed")} for r in lines]
    assert fields[0] == {"reason": "too-many-connections", "listener": "t", "suppressed": 0}
    assert fields[1] == {"reason": "too-many-connections", "listener": "t", "suppressed": 4}
