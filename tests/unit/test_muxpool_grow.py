"""The accept loop's mux path grows the pool in the background, and backs off after a failed dial."""

from __future__ import annotations

import datetime as dt
import logging
import time
import types
from typing import Any, cast

import pytest

from tapproof.agent import muxpool
from tapproof.agent.peerdial import DialRefused


def test_a_failed_background_dial_is_not_retried_per_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    material = object()
    rt = types.SimpleNamespace(creds=types.SimpleNamespace(current=material), now=lambda: dt.datetime.now(dt.UTC))
    busy = types.SimpleNamespace(
        load=3,
        closed=False,
        material=material,
        not_after=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        loop=types.SimpleNamespace(mux=types.SimpleNamespace(can_open=lambda: True)),
    )
    pool = muxpool.MuxPool(size=2)
    pool._peers["b"] = muxpool._Peer(conns=[cast("Any", busy)])
    dials: list[str] = []
    submitted: list[str] = []

    def refuse(_rt: Any, host: str, _material: Any, _fields: Any) -> None:
        dials.append(host)
        raise DialRefused("connect-failed", "connection refused")

    monkeypatch.setattr(pool, "_connect", refuse)
    monkeypatch.setattr(pool, "_submit", lambda *a: submitted.append(a[4]) or True)
    caplog.set_level(logging.WARNING, logger="tapproof.agent.muxpool")

    def one(target: str) -> bool:
        return pool.try_open(cast("Any", rt), cast("Any", None), "b", target, None, {"peer": "p", "address": "a"})

    def failures() -> list[object]:
        return [r.__dict__.get("reason") for r in caplog.records if r.msg == "mux-connect-failed"]

    def settle(logged: int) -> None:
        """Wait for the background dial to end: its count dropped and its line logged (after the lock)."""
        deadline = time.monotonic() + 5
        while (pool._peers["b"].connecting or len(failures()) < logged) and time.monotonic() < deadline:
            time.sleep(0.01)

    assert one("first")  # the busy connection takes it; a second connection is dialled meanwhile
    settle(1)
    assert pool._peers["b"].connecting == 0
    for i in range(20):  # the dial failed: every connection still goes to the live one, no new dial
        assert one(f"next-{i}")
    assert dials == ["b"]
    assert submitted == ["first"] + [f"next-{i}" for i in range(20)]
    assert failures() == ["connect-failed"]
    pool._peers["b"].grow_after = 0.0  # after GROW_RETRY the next busy moment dials again
    assert one("later")
    settle(2)  # (and no thread left to log after the test)
    assert dials == ["b", "b"]
    assert failures() == ["connect-failed", "connect-failed"]


def test_no_ready_connection_leaves_it_to_a_worker() -> None:
    rt = types.SimpleNamespace(creds=types.SimpleNamespace(current=object()), now=lambda: dt.datetime.now(dt.UTC))
    pool = muxpool.MuxPool()
    assert not pool.try_open(cast("Any", rt), cast("Any", None), "b", "echo", None, {})  # never seen: a worker dials
    pool._peers["b"] = muxpool._Peer(no_mux_until=time.monotonic() + 60)
    assert not pool.try_open(cast("Any", rt), cast("Any", None), "b", "echo", None, {})  # classic tunnels for now
