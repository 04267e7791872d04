"""The mux frame codec and stream states (sans-I/O): every frame, every refusal, the limits."""

from __future__ import annotations

import pytest

from tapproof.errors import LocalProtocolError, RemoteProtocolError
from tapproof.tunnel import mux, preamble
from tapproof.tunnel.mux import HEADER, FrameType


def _pair() -> tuple[mux.MuxConnection, mux.MuxConnection]:
    return mux.MuxConnection(client=True), mux.MuxConnection(client=False)


def _xfer(src: mux.MuxConnection, dst: mux.MuxConnection) -> list[mux.Event]:
    return dst.receive_data(src.data_to_send())


def _open(client: mux.MuxConnection, server: mux.MuxConnection, target: str = "redis", status: int = 200) -> int:
    sid = client.send_open(target, "10.0.0.2:5000")
    (ev,) = _xfer(client, server)
    assert ev == mux.StreamOpened(sid, preamble.parse_target(target), "10.0.0.2:5000")
    server.send_result(sid, status)
    assert _xfer(server, client) == [mux.OpenResult(sid, status)]
    return sid


def frame(ftype: int, sid: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, sid, len(payload)) + payload


def test_open_data_fin_both_ways_then_stream_is_gone() -> None:
    c, s = _pair()
    sid = _open(c, s, "10.0.0.1:6379")
    c.send_data(sid, b"ping")
    assert _xfer(c, s) == [mux.Data(sid, b"ping")]
    s.send_data(sid, b"pong")
    s.send_fin(sid)
    assert _xfer(s, c) == [mux.Data(sid, b"pong"), mux.StreamEnded(sid)]
    assert c.is_open(sid)
    assert s.is_open(sid)
    c.send_data(sid, b"more")
    c.send_fin(sid)
    assert _xfer(c, s) == [mux.Data(sid, b"more"), mux.StreamEnded(sid)]
    assert c.stream_count == 0
    assert s.stream_count == 0


@pytest.mark.parametrize("status", [400, 403, 502])
def test_refused_open_ends_the_stream(status: int) -> None:
    c, s = _pair()
    sid = _open(c, s, status=status)
    assert not c.is_open(sid)
    assert not s.is_open(sid)
    with pytest.raises(LocalProtocolError):
        c.send_data(sid, b"x")


def test_reset_reaches_the_peer_and_late_frames_are_ignored() -> None:
    c, s = _pair()
    sid = _open(c, s)
    s.send_data(sid, b"in flight")  # crosses the client's RST
    c.send_reset(sid, mux.ResetCode.ABORTED)
    assert _xfer(c, s) == [mux.StreamReset(sid, mux.ResetCode.ABORTED)]
    assert _xfer(s, c) == []  # data for a reset stream: dropped, not an error
    assert c.stream_count == 0
    assert s.stream_count == 0


def test_window_bounds_what_a_sender_may_send_and_what_a_receiver_accepts() -> None:
    c, s = _pair()
    sid = _open(c, s)
    assert c.send_window(sid) == mux.INITIAL_WINDOW
    c.send_data(sid, b"x" * mux.INITIAL_WINDOW)
    assert c.send_window(sid) == 0
    with pytest.raises(LocalProtocolError):
        c.send_data(sid, b"y")
    events = _xfer(c, s)
    assert sum(len(e.data) for e in events if isinstance(e, mux.Data)) == mux.INITIAL_WINDOW
    assert all(len(e.data) <= mux.MAX_FRAME_PAYLOAD for e in events if isinstance(e, mux.Data))
    s.consumed(sid, mux.INITIAL_WINDOW)
    assert _xfer(s, c) == [mux.WindowOpened(sid)]
    assert c.send_window(sid) == mux.INITIAL_WINDOW
    # a peer that ignores the window is a protocol error
    c2, s2 = _pair()
    sid2 = _open(c2, s2)
    blob = b"".join(frame(FrameType.DATA, sid2, b"z" * mux.MAX_FRAME_PAYLOAD) for _ in range(5))
    with pytest.raises(RemoteProtocolError, match="window"):
        s2.receive_data(blob)
    with pytest.raises(RemoteProtocolError):  # dead after an error
        s2.receive_data(b"")


def test_ping_is_answered_and_goaway_refuses_crossing_opens() -> None:
    c, s = _pair()
    c.send_ping(b"abcdefgh")
    assert _xfer(c, s) == []
    assert _xfer(s, c) == [mux.Pong(b"abcdefgh")]
    sid = _open(c, s)
    late = c.send_open("redis")  # crosses the server's GOAWAY
    s.send_goaway()
    assert _xfer(c, s) == []  # refused at once, not served
    assert _xfer(s, c) == [mux.GoAway(sid), mux.StreamReset(late, mux.ResetCode.REFUSED)]
    assert not c.can_open()
    assert s.is_open(sid)  # streams below the GOAWAY keep going


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (frame(FrameType.DATA, 1, b"x"), "never opened"),
        (frame(FrameType.OPEN, 1, b"redis"), "bad open"),
        (frame(FrameType.OPEN, 1, b"re dis\0"), "invalid open target"),
        (frame(FrameType.OPEN, 1, b"redis\0redis"), "invalid open source"),
        (frame(FrameType.OPEN, 1, b"a" * 2000 + b"\0"), "too long"),
        (frame(FrameType.OPEN, 0, b"redis\0"), "stream id"),
        (frame(FrameType.OPEN, 1, b"redis\0") + frame(FrameType.OPEN, 1, b"redis\0"), "increase"),
        (frame(FrameType.OPEN, 1, b"redis\0") + frame(FrameType.DATA, 1, b"x"), "before the stream was accepted"),
        (frame(FrameType.OPEN, 1, b"redis\0") + frame(FrameType.RESULT, 1, b"\0\xc8"), "from a client"),
        (frame(FrameType.PING, 1, b"12345678"), "connection frame"),
        (frame(FrameType.PING, 0, b"1234"), "bad ping"),
        (frame(FrameType.GOAWAY, 0, b"1"), "bad goaway"),
        (frame(FrameType.OPEN, 1, b"redis\0") + frame(42, 1), "unknown frame type"),
        (HEADER.pack(FrameType.DATA, 1, mux.MAX_FRAME_PAYLOAD + 1), "exceeds"),
    ],
)
def test_server_refuses_bad_frames(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        mux.MuxConnection(client=False).receive_data(data)


def test_client_refuses_bad_frames() -> None:
    c = mux.MuxConnection(client=True)
    sid = c.send_open("redis")
    for bad, match in [
        (frame(FrameType.OPEN, 5, b"redis\0"), "from a server"),
        (frame(FrameType.RESULT, sid, b"\x00\x64"), "unknown status"),
        (frame(FrameType.FIN, sid), "before the stream was accepted"),
        (frame(FrameType.WINDOW, sid, b"\0\0\0\0"), "zero window"),
    ]:
        c2 = mux.MuxConnection(client=True)
        c2.send_open("redis")
        with pytest.raises(RemoteProtocolError, match=match):
            c2.receive_data(bad)
    assert c.receive_data(frame(FrameType.RESULT, sid, b"\x00\xc8")) == [mux.OpenResult(sid, 200)]
    with pytest.raises(RemoteProtocolError, match="second result"):
        c.receive_data(frame(FrameType.RESULT, sid, b"\x00\xc8"))


def test_stream_cap_and_local_misuse() -> None:
    c, s = mux.MuxConnection(client=True, max_streams=2), mux.MuxConnection(client=False, max_streams=2)
    c.send_open("a")
    c.send_open("b")
    assert not c.can_open()
    with pytest.raises(LocalProtocolError):
        c.send_open("c")
    _xfer(c, s)
    with pytest.raises(RemoteProtocolError, match="too many streams"):
        s.receive_data(frame(FrameType.OPEN, 3, b"c\0"))
    with pytest.raises(LocalProtocolError):
        mux.MuxConnection(client=True).send_open("not a target")
    with pytest.raises(LocalProtocolError):
        mux.MuxConnection(client=False).send_open("redis")


def test_a_larger_receive_window_is_granted_once_the_stream_is_accepted() -> None:
    big = 4 * mux.INITIAL_WINDOW
    c = mux.MuxConnection(client=True, recv_window=big)
    s = mux.MuxConnection(client=False, recv_window=big)
    sid = c.send_open("redis")
    _xfer(c, s)
    s.send_result(sid, 200)
    # the RESULT and the server's grant travel together; the client grants its own back
    assert _xfer(s, c) == [mux.OpenResult(sid, 200), mux.WindowOpened(sid)]
    assert c.send_window(sid) == big
    assert _xfer(c, s) == [mux.WindowOpened(sid)]
    assert s.send_window(sid) == big
    # the receiver holds the sender to exactly the granted credit
    c.send_data(sid, b"x" * big)
    assert c.send_window(sid) == 0
    assert sum(len(e.data) for e in _xfer(c, s) if isinstance(e, mux.Data)) == big
    # credit comes back after a quarter of the window was consumed, not before
    s.consumed(sid, big // 4 - 1)
    assert s.pending_output == 0
    s.consumed(sid, 1)
    assert _xfer(s, c) == [mux.WindowOpened(sid)]
    assert c.send_window(sid) == big // 4
    # a refused stream gets no grant
    sid2 = c.send_open("redis")
    _xfer(c, s)
    s.send_result(sid2, 403)
    assert _xfer(s, c) == [mux.OpenResult(sid2, 403)]
    with pytest.raises(ValueError):
        mux.MuxConnection(client=True, recv_window=mux.INITIAL_WINDOW - 1)


def test_a_default_peer_interoperates_with_a_larger_window() -> None:
    c = mux.MuxConnection(client=True)  # an agent that only knows the initial window
    s = mux.MuxConnection(client=False, recv_window=2 * mux.INITIAL_WINDOW)
    sid = c.send_open("redis")
    _xfer(c, s)
    s.send_result(sid, 200)
    _xfer(s, c)
    assert c.send_window(sid) == 2 * mux.INITIAL_WINDOW
    assert s.send_window(sid) == mux.INITIAL_WINDOW
    c.send_data(sid, b"y" * (2 * mux.INITIAL_WINDOW))
    assert sum(len(e.data) for e in _xfer(c, s) if isinstance(e, mux.Data)) == 2 * mux.INITIAL_WINDOW


def test_a_direct_data_frame_header_accounts_like_send_data() -> None:
    c, s = _pair()
    sid = _open(c, s)
    head = c.data_frame_header(sid, 5)
    assert head == HEADER.pack(FrameType.DATA, sid, 5)
    assert c.send_window(sid) == mux.INITIAL_WINDOW - 5
    assert s.receive_data(head + b"hello") == [mux.Data(sid, b"hello")]
    for bad in (0, mux.MAX_FRAME_PAYLOAD + 1):
        with pytest.raises(LocalProtocolError):
            c.data_frame_header(sid, bad)
    c.send_data(sid, b"queued")  # something queued: a direct frame would overtake it
    with pytest.raises(LocalProtocolError, match="queued"):
        c.data_frame_header(sid, 1)
    c.send_data(sid, b"z" * (c.send_window(sid) - 10))
    c.data_to_send()
    with pytest.raises(LocalProtocolError, match="window"):
        c.data_frame_header(sid, 11)
    assert c.data_frame_header(sid, 10)
    c.send_data(sid, b"")  # an empty send is no frame (an empty DATA frame is a protocol error)
    assert c.pending_output == 0


def test_frames_split_anywhere_across_reads_and_memoryviews() -> None:
    c, s = _pair()
    sid = _open(c, s)
    c.send_data(sid, bytes(range(256)) * 300)
    c.send_fin(sid)
    wire = bytes(c.data_to_send())
    got: list[mux.Event] = []
    for i in range(0, len(wire), 7001):
        got += s.receive_data(memoryview(bytearray(wire[i : i + 7001])))
    data = b"".join(e.data for e in got if isinstance(e, mux.Data))
    assert data == bytes(range(256)) * 300
    assert got[-1] == mux.StreamEnded(sid)
