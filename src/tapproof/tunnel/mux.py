"""Stream multiplexing over one agent-pair TLS connection: a sans-I/O frame codec and stream states.

Negotiated with ALPN :data:`ALPN` on the tunnel port (see ``agent/muxloop``);
no sockets here. Like h11: :meth:`MuxConnection.receive_data` takes bytes and
returns events, the ``send_*`` methods queue frame bytes that
:meth:`MuxConnection.data_to_send` hands out. A peer that breaks the
protocol raises :class:`~tapproof.errors.RemoteProtocolError` (the connection
is then dead: close it, reset every stream); misuse by our own code raises
:class:`~tapproof.errors.LocalProtocolError`.

Frame: a 9-byte header ``type (u8) | stream id (u32) | length (u32)``, then
``length`` payload bytes (at most :data:`MAX_FRAME_PAYLOAD`).

==========  =========  ===========================================================
type        stream id  payload
==========  =========  ===========================================================
OPEN        > 0        ``target NUL source``: the CONNECT target (service name or
                       ``ip:port``, :func:`tapproof.tunnel.preamble.parse_target`
                       rules) and the application's ``ip:port`` (may be empty)
RESULT      > 0        u16 status: 200 open, 400, 403, 502 (as the preamble's)
DATA        > 0        application bytes (never empty); counts against the window
FIN         > 0        none: the sender's direction ended cleanly (half-close)
RST         > 0        u8 :class:`ResetCode`: the stream is aborted both ways
WINDOW      > 0        u32 credit: the receiver consumed that many DATA bytes
GOAWAY      0          u32 last stream id the sender will serve; no new OPEN
PING / PONG 0          8 opaque bytes (PING is answered by PONG automatically)
==========  =========  ===========================================================

Only the client (the side that made the TLS connection) opens streams, with
strictly increasing ids. Each stream starts with :data:`INITIAL_WINDOW` bytes
of send credit each way; a receiver may grant more with WINDOW at any time
(``recv_window``: a :class:`MuxConnection` grants the rest of it as soon as a
stream is accepted, so a bulk stream is not held to one small window per round
trip). A DATA frame beyond the credit the receiver granted is a protocol
error, so one stream never buffers more than that and a slow application only
stalls its own stream. Frames for a stream already ended or
reset are ignored (they crossed our RST on the wire).
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from tapproof.errors import LocalProtocolError, RemoteProtocolError
from tapproof.tunnel import preamble

__all__ = [
    "ALPN",
    "HEADER",
    "INITIAL_WINDOW",
    "MAX_FRAME_PAYLOAD",
    "MAX_STREAMS",
    "MAX_WINDOW",
    "Data",
    "Event",
    "FrameType",
    "GoAway",
    "MuxConnection",
    "OpenResult",
    "Pong",
    "ResetCode",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowOpened",
]

ALPN = b"tapproof-mux/1"
"""The ALPN protocol id a client offers to multiplex; absent: one tunnel per connection (CONNECT)."""

HEADER = struct.Struct("!BII")
MAX_FRAME_PAYLOAD = 64 * 1024
"""Largest payload of any frame."""
INITIAL_WINDOW = 256 * 1024
"""Send credit of each stream each way (the most a receiver buffers per stream)."""
MAX_STREAMS = 16384
"""Most streams open at once on one connection (an OPEN beyond it is a protocol error)."""
MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1
"""Largest send credit a stream may hold (a WINDOW beyond it is a protocol error)."""
_STATUS = struct.Struct("!H")
_U32 = struct.Struct("!I")
_STATUSES = frozenset(preamble.REASONS)


class FrameType(enum.IntEnum):
    """Frame types."""

    OPEN = 1
    RESULT = 2
    DATA = 3
    FIN = 4
    RST = 5
    WINDOW = 6
    GOAWAY = 7
    PING = 8
    PONG = 9


class ResetCode(enum.IntEnum):
    """Why a stream was reset (RST payload)."""

    ABORTED = 1  # the application or service reset its socket
    REFUSED = 2  # not served (goaway, draining): nothing reached a service
    IDLE_TIMEOUT = 3
    REVOKED = 4
    INTERNAL = 5


@dataclasses.dataclass(frozen=True)
class StreamOpened:
    """(server) The peer opened ``stream_id`` to ``target``; answer with :meth:`MuxConnection.send_result`."""

    stream_id: int
    target: preamble.Target
    source: str | None


@dataclasses.dataclass(frozen=True)
class OpenResult:
    """(client) The answer to our OPEN: ``status`` 200 means open."""

    stream_id: int
    status: int


@dataclasses.dataclass(frozen=True)
class Data:
    """Application bytes for ``stream_id``; call :meth:`MuxConnection.consumed` once delivered."""

    stream_id: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class StreamEnded:
    """The peer's direction of ``stream_id`` ended cleanly (FIN)."""

    stream_id: int


@dataclasses.dataclass(frozen=True)
class StreamReset:
    """The peer aborted ``stream_id``: the application must see an error, never a clean end."""

    stream_id: int
    code: int


@dataclasses.dataclass(frozen=True)
class WindowOpened:
    """The peer granted more send credit on ``stream_id`` (see :meth:`MuxConnection.send_window`)."""

    stream_id: int


@dataclasses.dataclass(frozen=True)
class GoAway:
    """The peer serves no stream above ``last_stream_id`` and takes no new OPEN."""

    last_stream_id: int


@dataclasses.dataclass(frozen=True)
class Pong:
    """The answer to one of our PINGs."""

    payload: bytes


Event = StreamOpened | OpenResult | Data | StreamEnded | StreamReset | WindowOpened | GoAway | Pong


class _Stream:
    __slots__ = ("accepted", "answered", "fin_recv", "fin_sent", "recv_window", "send_window", "unacked")

    def __init__(self) -> None:
        self.answered = False  # RESULT sent (server) / received (client)
        self.accepted = False  # the RESULT was 200
        self.fin_sent = False
        self.fin_recv = False
        self.send_window = INITIAL_WINDOW  # credit the peer granted us
        self.recv_window = INITIAL_WINDOW  # credit we granted the peer, not yet used
        self.unacked = 0  # bytes consumed locally, not yet returned with WINDOW


class MuxConnection:
    """The multiplexing state of one connection, ``client`` or server side (not thread-safe).

    ``recv_window`` is the credit this side keeps granted to the peer per
    stream (at least :data:`INITIAL_WINDOW`): the most it buffers for one
    stream whose application reads slowly.
    """

    def __init__(self, *, client: bool, max_streams: int = MAX_STREAMS, recv_window: int = INITIAL_WINDOW) -> None:
        if not INITIAL_WINDOW <= recv_window <= MAX_WINDOW:
            raise ValueError(f"recv_window must be within {INITIAL_WINDOW}..{MAX_WINDOW}")
        self.client = client
        self.max_streams = max_streams
        self.recv_window = recv_window
        """Credit granted to the peer per stream once it is accepted."""
        self._ack_at = recv_window // 4
        self._streams: dict[int, _Stream] = {}
        self._in = bytearray()
        self._out = bytearray()
        self._last_id = 0  # highest stream id opened (by either side's view)
        self._goaway_sent: int | None = None
        self.goaway_received: int | None = None
        """The last stream id of the peer's GOAWAY, once received."""
        self._dead = False

    # --- inspection ----------------------------------------------------------------
    @property
    def stream_count(self) -> int:
        """Streams not yet ended or reset."""
        return len(self._streams)

    def stream_ids(self) -> list[int]:
        """The ids of the live streams."""
        return list(self._streams)

    def is_open(self, stream_id: int) -> bool:
        """True while ``stream_id`` has not ended or been reset."""
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` may send on ``stream_id`` now (0 for an unknown stream)."""
        s = self._streams.get(stream_id)
        if s is None or s.fin_sent or not s.accepted:
            return 0
        return s.send_window

    def can_open(self) -> bool:
        """(client) True if a new OPEN is allowed (no GOAWAY either way, below the stream cap)."""
        return (
            self.client
            and not self._dead
            and self.goaway_received is None
            and self._goaway_sent is None
            and len(self._streams) < self.max_streams
            and self._last_id < MAX_STREAM_ID
        )

    def data_to_send(self) -> bytearray:
        """The queued frame bytes (then cleared: the buffer is handed over, not copied)."""
        out, self._out = self._out, bytearray()
        return out

    @property
    def pending_output(self) -> int:
        """Queued frame bytes not yet taken."""
        return len(self._out)

    # --- sending ---------------------------------------------------------------------
    def _frame(self, ftype: FrameType, stream_id: int, payload: bytes | memoryview = b"") -> None:
        self._out += HEADER.pack(ftype, stream_id, len(payload))
        self._out += payload

    def _live(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        return s

    def send_open(self, target: str, source: str | None = None) -> int:
        """(client) Open a stream to ``target``; return its id."""
        if not self.can_open():
            raise LocalProtocolError("cannot open a stream on this connection")
        parsed = preamble.parse_target(target)
        if source is not None and preamble.parse_target(source).kind is not preamble.Kind.ADDRESS:
            raise LocalProtocolError("source must be host:port")
        self._last_id += 1
        sid = self._last_id
        self._streams[sid] = _Stream()
        payload = str(parsed).encode("ascii") + b"\0" + (source or "").encode("ascii")
        self._frame(FrameType.OPEN, sid, payload)
        return sid

    def send_result(self, stream_id: int, status: int) -> None:
        """(server) Answer an OPEN; anything but 200 ends the stream."""
        s = self._live(stream_id)
        if self.client or s.answered:
            raise LocalProtocolError("result already sent or not a server")
        if status not in _STATUSES:
            raise LocalProtocolError(f"status {status} is not one a server agent sends")
        s.answered = True
        s.accepted = status == 200
        self._frame(FrameType.RESULT, stream_id, _STATUS.pack(status))
        if not s.accepted:
            del self._streams[stream_id]
            return
        self._grant(stream_id, s)

    def _grant(self, stream_id: int, s: _Stream) -> None:
        """A stream was accepted: raise the peer's credit from INITIAL_WINDOW to our ``recv_window``."""
        extra = self.recv_window - INITIAL_WINDOW
        if extra > 0:
            s.recv_window += extra
            self._frame(FrameType.WINDOW, stream_id, _U32.pack(extra))

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Send application bytes (at most :meth:`send_window`; split into frames here)."""
        self._take_window(stream_id, len(data))
        if not data:
            return
        if len(data) <= MAX_FRAME_PAYLOAD:  # the common case: no slice, one copy into the output
            self._frame(FrameType.DATA, stream_id, data)
            return
        view = memoryview(data)
        for i in range(0, len(view), MAX_FRAME_PAYLOAD):
            self._frame(FrameType.DATA, stream_id, view[i : i + MAX_FRAME_PAYLOAD])

    def data_frame_header(self, stream_id: int, length: int) -> bytes:
        """Account one DATA frame of ``length`` bytes and return its header, for a caller
        that sends header and payload itself (no copy through this object).

        Only while :attr:`pending_output` is 0 (else the frame would overtake queued ones);
        the caller must send the header and payload before anything queued after this call.
        """
        if self._out:
            raise LocalProtocolError("queued frames must be sent before a direct data frame")
        if not 0 < length <= MAX_FRAME_PAYLOAD:
            raise LocalProtocolError(f"a data frame carries 1..{MAX_FRAME_PAYLOAD} bytes, not {length}")
        self._take_window(stream_id, length)
        return HEADER.pack(FrameType.DATA, stream_id, length)

    def _take_window(self, stream_id: int, length: int) -> None:
        s = self._live(stream_id)
        if not s.accepted or s.fin_sent:
            raise LocalProtocolError(f"stream {stream_id} cannot send data now")
        if length > s.send_window:
            raise LocalProtocolError(f"{length} bytes exceed the send window of stream {stream_id}")
        s.send_window -= length

    def send_fin(self, stream_id: int) -> None:
        """End our direction of ``stream_id`` cleanly."""
        s = self._live(stream_id)
        if not s.accepted or s.fin_sent:
            raise LocalProtocolError(f"stream {stream_id} cannot send fin now")
        s.fin_sent = True
        self._frame(FrameType.FIN, stream_id)
        self._maybe_done(stream_id, s)

    def send_reset(self, stream_id: int, code: ResetCode = ResetCode.ABORTED) -> None:
        """Abort ``stream_id`` both ways (no-op if it already ended)."""
        if self._streams.pop(stream_id, None) is not None:
            self._frame(FrameType.RST, stream_id, bytes((int(code),)))

    def consumed(self, stream_id: int, n: int) -> None:
        """``n`` bytes of ``stream_id`` reached the application: grant the peer that credit back."""
        s = self._streams.get(stream_id)
        if s is None or n <= 0:
            return
        s.unacked += n
        if s.unacked >= self._ack_at and not s.fin_recv:
            s.recv_window += s.unacked
            self._frame(FrameType.WINDOW, stream_id, _U32.pack(s.unacked))
            s.unacked = 0

    def send_goaway(self) -> None:
        """Take no more OPENs (server) / open no more streams (client); idempotent."""
        if self._goaway_sent is None:
            self._goaway_sent = self._last_id
            self._frame(FrameType.GOAWAY, 0, _U32.pack(self._last_id))

    def send_ping(self, payload: bytes = b"\0" * 8) -> None:
        """Ask the peer for a PONG (liveness)."""
        if len(payload) != 8:
            raise LocalProtocolError("ping payload is 8 bytes")
        self._frame(FrameType.PING, 0, payload)

    def _maybe_done(self, stream_id: int, s: _Stream) -> None:
        if s.fin_sent and s.fin_recv:
            del self._streams[stream_id]

    # --- receiving -------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; return the events they complete.

        Raises :class:`RemoteProtocolError` on any violation (then the
        connection is dead and every further call raises too).
        """
        if self._dead:
            raise RemoteProtocolError("connection already failed")
        try:
            if self._in:  # a partial frame is waiting: complete it in our buffer
                self._in += data
                events, used = self._parse(self._in)
                del self._in[:used]
            else:  # parse the caller's buffer in place; keep only a trailing partial frame
                events, used = self._parse(data)
                if used < len(data):
                    self._in += memoryview(data)[used:]
        except RemoteProtocolError:
            self._dead = True
            self._in.clear()
            raise
        return events

    def _parse(self, buf: bytes | bytearray | memoryview) -> tuple[list[Event], int]:
        """The events of the whole frames at the start of ``buf``, and how many bytes they took."""
        events: list[Event] = []
        size = HEADER.size
        off = 0
        with memoryview(buf) as view:  # one copy per payload (a bytearray slice would copy twice)
            end = len(view)
            while end - off >= size:
                ftype, sid, length = HEADER.unpack_from(view, off)
                if length > MAX_FRAME_PAYLOAD:
                    raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_PAYLOAD}")
                if end - off - size < length:
                    break
                payload = view[off + size : off + size + length].tobytes()
                off += size + length
                event = self._handle(ftype, sid, payload)
                if event is not None:
                    events.append(event)
        return events, off

    def _handle(self, ftype: int, sid: int, payload: bytes) -> Event | None:
        if ftype in (FrameType.GOAWAY, FrameType.PING, FrameType.PONG):
            if sid != 0:
                raise RemoteProtocolError("connection frame on a stream id")
            if ftype == FrameType.GOAWAY:
                if len(payload) != 4:
                    raise RemoteProtocolError("bad goaway frame")
                (last,) = _U32.unpack(payload)
                if self.goaway_received is not None and last > self.goaway_received:
                    raise RemoteProtocolError("goaway raised its last stream id")
                self.goaway_received = last
                return GoAway(last)
            if len(payload) != 8:
                raise RemoteProtocolError("bad ping frame")
            if ftype == FrameType.PING:
                self._frame(FrameType.PONG, 0, payload)
                return None
            return Pong(payload)
        if sid == 0 or sid > MAX_STREAM_ID:
            raise RemoteProtocolError("stream frame without a valid stream id")
        if ftype == FrameType.OPEN:
            return self._on_open(sid, payload)
        if sid > self._last_id:
            raise RemoteProtocolError(f"frame for stream {sid} never opened")
        s = self._streams.get(sid)
        if ftype == FrameType.RST:
            if len(payload) != 1:
                raise RemoteProtocolError("bad rst frame")
            if s is None:
                return None
            del self._streams[sid]
            return StreamReset(sid, payload[0])
        if ftype == FrameType.RESULT:
            if not self.client:
                raise RemoteProtocolError("result frame from a client")
            if len(payload) != 2:
                raise RemoteProtocolError("bad result frame")
            (status,) = _STATUS.unpack(payload)
            if status not in _STATUSES:
                raise RemoteProtocolError(f"unknown status {status}")
            if s is None:
                return None
            if s.answered:
                raise RemoteProtocolError("second result for a stream")
            s.answered = True
            s.accepted = status == 200
            if not s.accepted:
                del self._streams[sid]
            else:
                self._grant(sid, s)
            return OpenResult(sid, status)
        if ftype == FrameType.DATA:
            if not payload:
                raise RemoteProtocolError("empty data frame")
            if s is None:
                return None
            if not s.accepted:
                raise RemoteProtocolError("data before the stream was accepted")
            if s.fin_recv:
                raise RemoteProtocolError("data after fin")
            if len(payload) > s.recv_window:
                raise RemoteProtocolError("data beyond the flow-control window")
            s.recv_window -= len(payload)
            return Data(sid, payload)
        if ftype == FrameType.FIN:
            if payload:
                raise RemoteProtocolError("bad fin frame")
            if s is None:
                return None
            if not s.accepted:
                raise RemoteProtocolError("fin before the stream was accepted")
            if s.fin_recv:
                raise RemoteProtocolError("second fin")
            s.fin_recv = True
            self._maybe_done(sid, s)
            return StreamEnded(sid)
        if ftype == FrameType.WINDOW:
            if len(payload) != 4:
                raise RemoteProtocolError("bad window frame")
            (credit,) = _U32.unpack(payload)
            if credit == 0:
                raise RemoteProtocolError("zero window increment")
            if s is None:
                return None
            if s.send_window + credit > MAX_WINDOW:
                raise RemoteProtocolError("window overflow")
            s.send_window += credit
            return WindowOpened(sid)
        raise RemoteProtocolError(f"unknown frame type {ftype}")

    def _on_open(self, sid: int, payload: bytes) -> StreamOpened | None:
        if self.client:
            raise RemoteProtocolError("open frame from a server")
        if sid <= self._last_id:
            raise RemoteProtocolError("stream ids must increase")
        if len(self._streams) >= self.max_streams:
            raise RemoteProtocolError("too many streams")
        raw_target, nul, raw_source = payload.partition(b"\0")
        if not nul:
            raise RemoteProtocolError("bad open frame")
        target = _target(raw_target, "target")
        source: str | None = None
        if raw_source:
            parsed = _target(raw_source, "source")
            if parsed.kind is not preamble.Kind.ADDRESS:
                raise RemoteProtocolError("invalid open source")
            source = str(parsed)
        self._last_id = sid
        if self._goaway_sent is not None:  # crossed our GOAWAY on the wire: refused, nothing served
            self._frame(FrameType.RST, sid, bytes((int(ResetCode.REFUSED),)))
            return None
        self._streams[sid] = _Stream()
        return StreamOpened(sid, target, source)


def _target(raw: bytes, what: str) -> preamble.Target:
    if len(raw) > preamble.MAX_LINE_BYTES:
        raise RemoteProtocolError(f"open {what} too long")
    try:
        return preamble.parse_target(raw.decode("ascii"))
    except (UnicodeDecodeError, LocalProtocolError):
        raise RemoteProtocolError(f"invalid open {what}") from None
