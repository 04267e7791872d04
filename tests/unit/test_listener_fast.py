"""The listener's fast path: taken in the accept loop when it can, the worker thread otherwise."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tapproof.listener import Listener, bind


def _wait(pred: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_fast_path_takes_what_it_can_and_workers_get_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    fast_taken: list[socket.socket] = []
    worker_got: list[str] = []
    accept_thread: list[str] = []

    def fast(conn: socket.socket, _addr: tuple[str, int]) -> bool:
        accept_thread.append(threading.current_thread().name)
        first = conn.recv(1, socket.MSG_PEEK)
        if first == b"F":
            fast_taken.append(conn)
            return True
        if first == b"X":
            raise RuntimeError("a bug in the fast path")
        return False

    def handler(conn: socket.socket, _addr: tuple[str, int]) -> None:
        worker_got.append(threading.current_thread().name)
        conn.close()

    lst = Listener(bind("127.0.0.1", 0, what="test"), handler, name="t", fast=fast)
    lst.start()
    addr = lst.sock.getsockname()[:2]
    try:
        for first in (b"F", b"W", b"X", b"F", b"W"):
            c = socket.create_connection(addr)
            c.sendall(first)
            if first == b"X":  # dropped, not leaked: the client sees the close (a reset: its byte was unread)
                c.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert c.recv(1) == b""
            c.close()
        assert _wait(lambda: len(fast_taken) == 2 and len(worker_got) == 2)
    finally:
        lst.stop()
        for c in fast_taken:
            c.close()
    assert set(accept_thread) == {"accept-t"}  # the fast path runs in the accept loop itself
    assert all(name == "conn-t" for name in worker_got)
    assert lst.running is False
    assert any(getattr(r, "event", "") == "handler-crashed" for r in caplog.records)
