"""Flow table and reassembly: direction, out of order, overlaps, limits, port reuse."""

from __future__ import annotations

import random

from tapproof.audit import synth
from tapproof.audit.capture import decode
from tapproof.audit.flows import FlowTable, Stream
from tapproof.audit.report import build_report, flow_record


def test_stream_in_order_out_of_order_and_overlap() -> None:
    s = Stream(limit=100, base=1000)
    assert s.add(1000, b"abc")
    assert not s.add(1006, b"ghi")  # gap
    assert s.add(1003, b"dXfg")  # fills the gap; overlaps "g" (first arrival wins for 1006)
    assert bytes(s.data) == b"abcdXfghi"
    assert not s.add(1001, b"ZZ")  # retransmission of old bytes: nothing new
    assert bytes(s.data) == b"abcdXfghi"


def test_stream_limit_and_wraparound() -> None:
    s = Stream(limit=8, base=0xFFFFFFFE)
    assert s.add(0xFFFFFFFE, b"ab")
    assert s.add(0, b"cdefghijkl")
    assert bytes(s.data) == b"abcdefgh"
    assert s.full
    assert not s.add(10, b"more")


def test_stream_segment_before_base_is_trimmed() -> None:
    s = Stream(limit=50, base=100)
    assert s.add(95, b"0123456789")
    assert bytes(s.data) == b"56789"


def _table(frames: list[tuple[float, bytes]], limit: int = 16384) -> FlowTable:
    t = FlowTable(limit=limit)
    for ts, fr in frames:
        seg = decode(1, fr)
        assert seg is not None
        t.add(ts, seg)
    t.flush()
    return t


def _pq_conv(**kw: object) -> list[tuple[float, bytes]]:
    ex = [("c", synth.client_hello()), ("s", synth.server_hello() + synth.app_data(5000)), ("c", synth.app_data(900))]
    return list(synth.conversation(("10.1.1.1", 50000), ("10.1.1.2", 8443), ex, mss=100, **kw))  # type: ignore[arg-type]


def test_handshake_across_segments_shuffled() -> None:
    frames = _pq_conv()
    head, data, tail = frames[:3], frames[3:-3], frames[-3:]
    random.Random(4).shuffle(data)
    t = _table(head + data + tail)
    (flow,) = t.finished
    rec = flow_record(flow)
    assert rec["grade"] == "A"
    assert rec["src"] == "10.1.1.1"
    assert rec["bytes_c2s"] == len(synth.client_hello()) + len(synth.app_data(900))
    assert rec["packets"] == len(frames)
    assert not rec["midstream"]


def test_duplicated_segments_do_not_break_parsing() -> None:
    frames = _pq_conv()
    dup = frames[:5] + frames[3:5] + frames[5:]
    assert flow_record(_table(dup).finished[0])["grade"] == "A"


def test_midstream_flow_without_syn() -> None:
    frames = _pq_conv(handshake=False)
    rec = flow_record(_table(frames).finished[0])
    assert rec["midstream"]
    assert rec["grade"] == "A"  # the handshake is still in the capture


def test_capture_starting_after_handshake_is_undetermined() -> None:
    ex = [("s", synth.app_data(3000)), ("c", synth.app_data(3000))]
    frames = list(synth.conversation(("10.1.1.1", 50000), ("10.1.1.2", 8443), ex, handshake=False))
    rec = flow_record(_table(frames).finished[0])
    assert rec["protocol"] == "tls"
    assert rec["grade"] == "?"


def test_syn_ack_sets_client_and_port_reuse_makes_new_flow() -> None:
    a = _pq_conv()
    b = [
        (ts + 10, fr)
        for ts, fr in synth.conversation(
            ("10.1.1.1", 50000), ("10.1.1.2", 8443), [("c", b"GET / HTTP/1.1\r\n\r\n")], isn=(9000, 7000)
        )
    ]
    t = _table(a + b)
    grades = [flow_record(f)["grade"] for f in t.finished]
    assert grades == ["A", "F"]


def test_memory_is_bounded_by_live_flows() -> None:
    t = FlowTable(limit=1024)
    peak = 0
    for i in range(300):  # 300 sequential unknown-protocol flows, 20 KB each way
        frames = synth.conversation(
            ("10.2.0.1", 30000 + i), ("10.2.0.2", 9999), [("c", bytes(range(256)) * 80)], t0=1000.0 + i
        )
        for ts, fr in frames:
            seg = decode(1, fr)
            assert seg is not None
            t.add(ts, seg)
            peak = max(peak, t.buffered_bytes())
    t.flush()
    assert peak <= 2 * 2 * 1024
    assert len(t.live) == 0
    assert len(t.finished) == 300


def test_decided_flows_drop_buffers() -> None:
    t = FlowTable()
    for ts, fr in list(
        synth.conversation(
            ("10.0.0.1", 1234),
            ("10.0.0.2", 443),
            [("c", synth.client_hello()), ("s", synth.server_hello())],
            close=False,
        )
    ):
        seg = decode(1, fr)
        assert seg is not None
        t.add(ts, seg)
    (flow, _), *_ = t.live.values()
    assert flow.decided
    assert flow.c2s is None
    assert t.buffered_bytes() == 0
    t.flush()
    assert build_report_ok(t)


def build_report_ok(t: FlowTable) -> bool:
    from tapproof.audit.pipeline import AuditResult

    rep = build_report(AuditResult(flows=t.finished, files=[]))
    return bool(rep["summary"]["coverage"]["pq_bytes"] == 1.0)
