"""Property tests of the mux codec: streams carry bytes intact under any interleaving and split."""

from __future__ import annotations

import contextlib
import hashlib

from fuzz.targets import MUX_SEEDS, mux_frames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapproof.errors import LocalProtocolError, RemoteProtocolError
from tapproof.tunnel import mux

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["c2s", "s2c", "fin-c", "fin-s", "rst", "flush"]), st.integers(0, 5), st.integers(1, 9000)
    ),
    max_size=60,
)


def _deliver(src: mux.MuxConnection, dst: mux.MuxConnection, cuts: list[int], got: dict[int, bytearray]) -> list:
    data = src.data_to_send()
    events: list[mux.Event] = []
    pos = 0
    for cut in [*cuts, len(data)]:
        end = min(len(data), pos + cut)
        events += dst.receive_data(data[pos:end])
        pos = end
        if pos >= len(data):
            break
    if pos < len(data):
        events += dst.receive_data(data[pos:])
    for ev in events:
        if isinstance(ev, mux.Data):
            got.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            dst.consumed(ev.stream_id, len(ev.data))
    return events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6), refuse=st.sets(st.integers(0, 5)), ops=_OPS, cuts=st.lists(st.integers(1, 40000), max_size=8)
)
def test_streams_deliver_exactly_what_was_sent(n: int, refuse: set[int], ops: list, cuts: list[int]) -> None:
    c, s = mux.MuxConnection(client=True), mux.MuxConnection(client=False)
    sids = [c.send_open(f"svc{i}") for i in range(n)]
    opened = _deliver(c, s, cuts, {})
    assert [e.stream_id for e in opened if isinstance(e, mux.StreamOpened)] == sids
    for i, sid in enumerate(sids):
        s.send_result(sid, 403 if i in refuse else 200)
    _deliver(s, c, cuts, {})
    sent = {"c": {sid: bytearray() for sid in sids}, "s": {sid: bytearray() for sid in sids}}
    got: dict[str, dict[int, bytearray]] = {"c": {}, "s": {}}
    reset: set[int] = set()
    for op, k, size in ops:
        sid = sids[k % n]
        if op == "flush":
            _deliver(c, s, cuts, got["s"])
            _deliver(s, c, cuts, got["c"])
            continue
        side, _peer, key = (c, s, "c") if op in ("c2s", "fin-c", "rst") else (s, c, "s")
        if op == "rst":
            if c.is_open(sid):
                c.send_reset(sid)
                reset.add(sid)
            continue
        if op.startswith("fin"):
            with contextlib.suppress(LocalProtocolError):  # fin twice, refused or reset: a local misuse, skipped
                side.send_fin(sid)
            continue
        room = min(size, side.send_window(sid))
        if room:
            blob = hashlib.sha256(f"{op}{sid}{size}{len(sent[key][sid])}".encode()).digest() * (room // 32 + 1)
            side.send_data(sid, blob[:room])
            sent[key][sid] += blob[:room]
    for _ in range(4):  # settle: windows reopen, everything in flight arrives
        _deliver(c, s, cuts, got["s"])
        _deliver(s, c, cuts, got["c"])
    for i, sid in enumerate(sids):
        if i in refuse:
            assert not sent["c"][sid]
            assert not sent["s"][sid]
        elif sid not in reset:
            assert got["s"].get(sid, b"") == sent["c"][sid]
            assert got["c"].get(sid, b"") == sent["s"][sid]
        else:  # a reset stream: what arrived is a prefix of what was sent
            assert sent["c"][sid].startswith(got["s"].get(sid, b""))


@settings(max_examples=300, deadline=None)
@given(
    seed=st.sampled_from(MUX_SEEDS), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6)
)
def test_mutated_frames_decode_or_raise_the_protocol_error(seed: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(seed)
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    mux_frames(bytes(data))  # raises anything but RemoteProtocolError only on a bug


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400))
def test_garbage_decodes_or_raises_the_protocol_error(data: bytes) -> None:
    for client in (True, False):
        m = mux.MuxConnection(client=client)
        if client:
            m.send_open("redis")
        with contextlib.suppress(RemoteProtocolError):
            m.receive_data(data)
