"""A userspace recording tap: a TCP relay that writes every byte it forwards to a real pcap.

Each forwarded chunk becomes one or more synthetic Ethernet/IPv4/TCP frames
(built with dpkt, correct lengths, sequence numbers and checksums), preceded
by a three-way handshake and followed by FINs, so ``tapproof audit pcap``,
tcpdump and Wireshark read the capture like one taken on a wire. The frames
carry the real endpoints: the connecting peer and the upstream address.

This is what an attacker with a fibre splice sees, minus the timing: it
records, never alters. The relay does no per-byte Python work (``recv`` into
a chunk, write the chunk, ``sendall`` it).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import dpkt

__all__ = ["PcapRecorder", "TapRelay", "TapStats"]

log = logging.getLogger(__name__)

_CHUNK = 65536
_SEGMENT = 16000  # payload per synthetic frame (keeps the IPv4 total length far below 65535)
_MAX_CONNECTIONS = 64
_MAC_A = b"\x02\x00\x00\x00\x0d\x01"
_MAC_B = b"\x02\x00\x00\x00\x0d\x02"
_SYN, _ACK, _FIN, _PSH = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_FIN, dpkt.tcp.TH_PUSH


@dataclass(slots=True)
class TapStats:
    """What the tap forwarded (and recorded)."""

    connections: int = 0
    bytes: int = 0
    packets: int = 0


class _Half:
    """One direction of a recorded connection: its addresses and next sequence number."""

    __slots__ = ("dst", "mac_dst", "mac_src", "port_dst", "port_src", "seq", "src")

    def __init__(self, src: tuple[str, int], dst: tuple[str, int], mac_src: bytes, mac_dst: bytes) -> None:
        self.src = socket.inet_aton(src[0])
        self.dst = socket.inet_aton(dst[0])
        self.port_src = src[1]
        self.port_dst = dst[1]
        self.mac_src = mac_src
        self.mac_dst = mac_dst
        self.seq = secrets.randbits(32)


class PcapRecorder:
    """Writes synthetic TCP conversations to one pcap file (thread-safe)."""

    def __init__(self, path: Path) -> None:
        """Create (truncate) the file and write the pcap header (Ethernet link type)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: BinaryIO = path.open("wb")
        self._writer = dpkt.pcap.Writer(self._fh, linktype=dpkt.pcap.DLT_EN10MB)
        self._lock = threading.Lock()
        self.stats = TapStats()

    def _frame(self, half: _Half, other: _Half, flags: int, payload: bytes = b"") -> bytes:
        tcp = dpkt.tcp.TCP(
            sport=half.port_src,
            dport=half.port_dst,
            seq=half.seq,
            ack=other.seq if flags & _ACK else 0,
            flags=flags,
            win=65535,
            data=payload,
        )
        ip = dpkt.ip.IP(src=half.src, dst=half.dst, p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=tcp)
        ip.len = len(ip)
        return bytes(
            dpkt.ethernet.Ethernet(src=half.mac_src, dst=half.mac_dst, type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
        )

    def _write(self, frames: list[bytes]) -> None:
        with self._lock:
            if self._fh.closed:
                return
            ts = time.time()
            for f in frames:
                self._writer.writepkt(f, ts)
            self._fh.flush()
            self.stats.packets += len(frames)

    def open_conversation(self, client: tuple[str, int], server: tuple[str, int]) -> tuple[_Half, _Half]:
        """Record a three-way handshake; return the (client->server, server->client) halves."""
        c2s = _Half(client, server, _MAC_A, _MAC_B)
        s2c = _Half(server, client, _MAC_B, _MAC_A)
        frames = [self._frame(c2s, s2c, _SYN)]
        c2s.seq = (c2s.seq + 1) & 0xFFFFFFFF
        frames.append(self._frame(s2c, c2s, _SYN | _ACK))
        s2c.seq = (s2c.seq + 1) & 0xFFFFFFFF
        frames.append(self._frame(c2s, s2c, _ACK))
        self._write(frames)
        with self._lock:
            self.stats.connections += 1
        return c2s, s2c

    def data(self, half: _Half, other: _Half, payload: bytes) -> None:
        """Record payload sent in the direction of ``half``."""
        frames = []
        for i in range(0, len(payload), _SEGMENT):
            seg = payload[i : i + _SEGMENT]
            frames.append(self._frame(half, other, _ACK | _PSH, seg))
            half.seq = (half.seq + len(seg)) & 0xFFFFFFFF
        self._write(frames)
        with self._lock:
            self.stats.bytes += len(payload)

    def fin(self, half: _Half, other: _Half) -> None:
        """Record a FIN in the direction of ``half``."""
        frame = self._frame(half, other, _FIN | _ACK)
        half.seq = (half.seq + 1) & 0xFFFFFFFF
        self._write([frame])

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


class TapRelay:
    """Listen, forward each connection to ``upstream``, record both directions to a pcap.

    ``upstream`` may be set after start (the demo learns the far agent's port
    only once it runs); a connection arriving before that is refused.
    """

    def __init__(self, pcap: Path, upstream: tuple[str, int] | None = None, listen: tuple[str, int] = ("127.0.0.1", 0)):
        """Bind the listener now (so its address is known) and open the capture file."""
        self.upstream = upstream
        self.recorder = PcapRecorder(pcap)
        self._srv = socket.create_server(listen, backlog=64)
        self._srv.settimeout(0.2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name="tap-accept", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the tap listens on."""
        host, port = self._srv.getsockname()[:2]
        return str(host), int(port)

    @property
    def stats(self) -> TapStats:
        """Connections, bytes and frames recorded so far."""
        return self.recorder.stats

    def start(self) -> TapRelay:
        """Start accepting."""
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                full = len(self._threads) >= _MAX_CONNECTIONS
            if full or self.upstream is None:
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn, peer, self.upstream), name="tap-conn", daemon=True)
            with self._lock:
                self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket, peer: tuple[str, int], upstream: tuple[str, int]) -> None:
        try:
            server = socket.create_connection(upstream, timeout=5.0)
        except OSError as exc:
            log.warning("tap-upstream-failed", extra={"event": "tap-upstream-failed", "error": str(exc)})
            client.close()
            return
        server.settimeout(None)
        client.settimeout(None)
        with self._lock:
            self._socks.update((client, server))
        c2s, s2c = self.recorder.open_conversation((peer[0], peer[1]), upstream)
        back = threading.Thread(target=self._pump, args=(server, client, s2c, c2s), name="tap-s2c", daemon=True)
        back.start()
        self._pump(client, server, c2s, s2c)
        back.join(30.0)
        for s in (client, server):
            with contextlib.suppress(OSError):
                s.close()
        with self._lock:
            self._socks.difference_update((client, server))

    def _pump(self, src: socket.socket, dst: socket.socket, half: _Half, other: _Half) -> None:
        rec = self.recorder
        try:
            while chunk := src.recv(_CHUNK):
                rec.data(half, other, chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        rec.fin(half, other)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> TapStats:
        """Stop accepting, cut live connections, wait (bounded) for the threads, close the capture."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._srv.close()
        if self._acceptor.is_alive():
            self._acceptor.join(2.0)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(2.0)
        self.recorder.close()
        return self.stats
