"""The flow table: TCP flows keyed by 5-tuple, both directions, with bounded reassembly.

Memory is bounded by the flows that are live *and* undecided: each keeps at
most ``limit`` bytes per direction (plus as much again of out-of-order
segments). Once the classifier has decided a flow, its buffers are dropped and
later packets only update counters (the fast path). Closed flows leave the
live table and keep only their small summary record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from tapproof.audit.capture import TCPSegment
from tapproof.audit.classify import Classification, classify
from tapproof.audit.verdict import Verdict, grade

__all__ = ["DEFAULT_LIMIT", "Flow", "FlowTable", "Stream"]

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
DEFAULT_LIMIT = 16 * 1024
IDLE_TIMEOUT = 300.0  # capture seconds without a packet before an undecided flow is decided
CLOSED_LINGER = 30.0  # capture seconds a closed flow stays live for late ACKs and retransmissions


class Stream:
    """Reassembles the first ``limit`` bytes of one direction of a TCP connection.

    Out-of-order segments wait in ``pending`` until the gap before them fills;
    where segments overlap, the bytes that arrived first are kept.
    """

    __slots__ = ("base", "data", "limit", "pending", "pending_bytes")

    def __init__(self, limit: int, base: int | None = None) -> None:
        self.base = base
        self.data = bytearray()
        self.limit = limit
        self.pending: dict[int, bytes] = {}
        self.pending_bytes = 0

    @property
    def full(self) -> bool:
        """True once ``limit`` contiguous bytes are held."""
        return len(self.data) >= self.limit

    def add(self, seq: int, payload: bytes) -> bool:
        """Add a segment; return True if the contiguous data grew."""
        if not payload:
            return False
        if self.base is None:
            self.base = seq
        off = (seq - self.base) & 0xFFFFFFFF
        if off >= 0x80000000:  # starts before the stream start: keep only the part after it
            back = 0x100000000 - off
            if back >= len(payload):
                return False
            payload, off = payload[back:], 0
        end = len(self.data)
        if end >= self.limit:
            return False
        if off > end:
            if off < self.limit and off not in self.pending and self.pending_bytes < self.limit:
                chunk = payload[: self.limit - off]
                self.pending[off] = chunk
                self.pending_bytes += len(chunk)
            return False
        new = payload[end - off :]
        if not new:
            return False
        self.data += new[: self.limit - end]
        if self.pending:
            self._drain()
        return True

    def _drain(self) -> None:
        for poff in sorted(self.pending):
            end = len(self.data)
            if poff > end:
                break
            chunk = self.pending.pop(poff)
            self.pending_bytes -= len(chunk)
            tail = chunk[end - poff :]
            if tail and end < self.limit:
                self.data += tail[: self.limit - end]


@dataclass(slots=True, eq=False)
class Flow:
    """One TCP connection as seen by the tap."""

    client: bytes
    cport: int
    server: bytes
    sport: int
    first_seen: float
    last_seen: float
    syn_seen: bool = False
    packets: int = 0
    bytes_c2s: int = 0
    bytes_s2c: int = 0
    fin_c: bool = False
    fin_s: bool = False
    rst: bool = False
    closed: bool = False
    c2s: Stream | None = None
    s2c: Stream | None = None
    want_c: int = 1
    want_s: int = 1
    cls: Classification | None = None
    verdict: Verdict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def decided(self) -> bool:
        """True once the verdict is final."""
        return self.verdict is not None

    @property
    def midstream(self) -> bool:
        """True when the flow's start was not captured."""
        return not self.syn_seen


def _pick_client(seg: TCPSegment) -> bool:
    """True if ``seg.src`` is the client of a flow first seen with this segment."""
    if seg.flags & SYN:
        return not seg.flags & ACK
    if seg.sport == seg.dport:
        return True
    return seg.sport > seg.dport  # the service usually has the smaller port


class FlowTable:
    """Feeds TCP segments into flows, classifies them, and yields finished flows."""

    def __init__(self, limit: int = DEFAULT_LIMIT, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.live: dict[tuple[bytes, int, bytes, int], tuple[Flow, bool]] = {}
        self.finished: list[Flow] = []
        self._since_sweep = 0

    def _new(self, ts: float, seg: TCPSegment) -> tuple[Flow, bool]:
        if _pick_client(seg):
            flow = Flow(seg.src, seg.sport, seg.dst, seg.dport, ts, ts)
            c2s = True
        else:
            flow = Flow(seg.dst, seg.dport, seg.src, seg.sport, ts, ts)
            c2s = False
        flow.c2s = Stream(self.limit)
        flow.s2c = Stream(self.limit)
        self.live[(seg.src, seg.sport, seg.dst, seg.dport)] = (flow, c2s)
        self.live[(seg.dst, seg.dport, seg.src, seg.sport)] = (flow, not c2s)
        return flow, c2s

    def add(self, ts: float, seg: TCPSegment) -> None:
        """Account one TCP segment."""
        entry = self.live.get((seg.src, seg.sport, seg.dst, seg.dport))
        flags = seg.flags
        if entry is None:
            flow, c2s = self._new(ts, seg)
        else:
            flow, c2s = entry
            if flags & SYN and not flags & ACK and (flow.fin_c or flow.fin_s or flow.rst):
                self._retire(flow)  # the 4-tuple is reused by a new connection
                flow, c2s = self._new(ts, seg)
        flow.packets += 1
        flow.last_seen = ts
        if c2s:
            flow.bytes_c2s += seg.length
        else:
            flow.bytes_s2c += seg.length
        if flags & (FIN | RST):
            if flags & RST:
                flow.rst = True
            elif c2s:
                flow.fin_c = True
            else:
                flow.fin_s = True
        if flow.verdict is None:
            self._undecided(flow, c2s, seg)
        if not flow.closed and (flow.rst or (flow.fin_c and flow.fin_s)):
            self._close(flow)
        self._since_sweep += 1
        if self._since_sweep >= 65536:
            self._sweep(ts)

    def _undecided(self, flow: Flow, c2s: bool, seg: TCPSegment) -> None:
        cs, ss = flow.c2s, flow.s2c
        if cs is None or ss is None:  # decided flows never get here
            return
        flags = seg.flags
        if flags & SYN:
            if flags & ACK:  # SYN-ACK: both stream starts are known
                flow.syn_seen = True
                (ss if c2s is False else cs).base = (seg.seq + 1) & 0xFFFFFFFF
                if not (cs if c2s is False else ss).data:
                    (cs if c2s is False else ss).base = seg.ack
            else:
                flow.syn_seen = True
                (cs if c2s else ss).base = (seg.seq + 1) & 0xFFFFFFFF
            return
        if not seg.payload:
            return
        stream = cs if c2s else ss
        if not stream.add(seg.seq, seg.payload):
            return
        if len(cs.data) >= flow.want_c or len(ss.data) >= flow.want_s or cs.full or ss.full:
            self._classify(flow, final=cs.full and ss.full)

    def _classify(self, flow: Flow, *, final: bool) -> None:
        cs, ss = flow.c2s, flow.s2c
        c = bytes(cs.data) if cs else b""
        s = bytes(ss.data) if ss else b""
        final = final or (cs is not None and cs.full) or (ss is not None and ss.full)
        cl = classify(c, s, port=flow.sport, final=final, midstream=flow.midstream)
        if cl.swap:
            flow.client, flow.server = flow.server, flow.client
            flow.cport, flow.sport = flow.sport, flow.cport
            flow.bytes_c2s, flow.bytes_s2c = flow.bytes_s2c, flow.bytes_c2s
            flow.fin_c, flow.fin_s = flow.fin_s, flow.fin_c
            flow.c2s, flow.s2c = flow.s2c, flow.c2s
            fwd = (flow.client, flow.cport, flow.server, flow.sport)
            rev = (flow.server, flow.sport, flow.client, flow.cport)
            if self.live.get(fwd, (None,))[0] is flow:
                self.live[fwd] = (flow, True)
                self.live[rev] = (flow, False)
            cl.swap = False
        flow.cls = cl
        if cl.done or final:
            flow.verdict = grade(cl)
            flow.c2s = flow.s2c = None
        else:
            flow.want_c = max(cl.need_client, 1) if cl.need_client else 1 << 62
            flow.want_s = max(cl.need_server, 1) if cl.need_server else 1 << 62

    def _close(self, flow: Flow) -> None:
        """Decide a flow whose connection ended; it stays live for its last ACKs."""
        if flow.verdict is None:
            self._classify(flow, final=True)
        flow.closed = True

    def _retire(self, flow: Flow) -> None:
        """Move a flow from the live table to the finished list."""
        if flow.verdict is None:
            self._classify(flow, final=True)
        for key in (
            (flow.client, flow.cport, flow.server, flow.sport),
            (flow.server, flow.sport, flow.client, flow.cport),
        ):
            entry = self.live.get(key)
            if entry is not None and entry[0] is flow:
                del self.live[key]
        self.finished.append(flow)

    def _sweep(self, now: float) -> None:
        """Decide undecided flows idle for ``idle_timeout`` (frees their buffers); retire closed ones."""
        self._since_sweep = 0
        for flow, c2s in list(self.live.values()):
            if not c2s:
                continue
            if flow.closed and now - flow.last_seen > CLOSED_LINGER:
                self._retire(flow)
            elif flow.verdict is None and now - flow.last_seen > self.idle_timeout:
                self._classify(flow, final=True)

    def buffered_bytes(self) -> int:
        """Bytes held in reassembly buffers right now (for tests of the memory bound)."""
        total = 0
        for flow, c2s in self.live.values():
            if c2s:
                for st in (flow.c2s, flow.s2c):
                    if st is not None:
                        total += len(st.data) + st.pending_bytes
        return total

    def flush(self) -> None:
        """Decide and retire every live flow (end of the capture)."""
        for flow, c2s in list(self.live.values()):
            if c2s:
                self._retire(flow)

    def flows(self) -> Iterator[Flow]:
        """All finished flows, in the order they closed."""
        return iter(self.finished)
