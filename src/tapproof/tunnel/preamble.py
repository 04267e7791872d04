"""The CONNECT preamble of a tunnel, sans-I/O.

After the mutual-TLS handshake between two agents the client agent sends::

    CONNECT <target> HTTP/1.1\\r\\n
    Host: <target>\\r\\n
    Tapproof-Source: <original client ip:port>\\r\\n      (optional)
    Tapproof-Request-Id: <id>\\r\\n                       (optional)
    \\r\\n

and the server agent answers ``HTTP/1.1 200 OK`` (then raw bytes flow),
``403 Forbidden`` (policy), ``502 Bad Gateway`` (service unreachable) or
``400 Bad Request`` (malformed), each with minimal headers and no body.

``<target>`` is a service name (``redis``, the grammar of
:func:`tapproof.identity.check_name`) or ``host:port`` (transparent mode), host
being a DNS name, a dotted IPv4 address or a bracketed IPv6 address.

Two small state machines, no sockets: :class:`ServerPreamble` is fed bytes
and yields one :class:`ConnectRequest`, :class:`ClientPreamble` builds the
request bytes and is fed the response bytes and yields one
:class:`ConnectResponse`. Both hand back the bytes that followed the blank
line (:attr:`~ServerPreamble.leftover`): the client may pipeline its first
application bytes right behind the request.

Why a hand-written parser rather than h11 (which is a dependency): h11 is a
general HTTP/1.1 implementation and lenient where we want to be strict (it
accepts bare ``LF`` line ends, HTTP/1.0, every method, any header count, and
treats CONNECT as a protocol switch that we would have to unwind). Our grammar
is tiny and fixed; the strict limits below (request line <= 1 KiB, head <= 8
KiB, <= 32 headers, CRLF only, no obs-fold, exact target syntax) are easier to
prove in ~150 lines of our own, and every failure maps to exactly one error
type: :class:`~tapproof.errors.RemoteProtocolError` when the peer broke the
grammar, :class:`~tapproof.errors.LocalProtocolError` when we misused the
machine or asked it to produce something invalid.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re

from tapproof.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_LINE_BYTES",
    "REASONS",
    "ClientPreamble",
    "ConnectRequest",
    "ConnectResponse",
    "ServerPreamble",
    "Target",
    "parse_target",
]

MAX_LINE_BYTES = 1024
"""Longest request/status line, without its CRLF."""
MAX_HEAD_BYTES = 8192
"""Longest head (request line, headers and the blank line)."""
MAX_HEADERS = 32
"""Most header lines."""

REASONS: dict[int, str] = {200: "OK", 400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}
"""The statuses a server agent sends, with their reason phrases."""

_NAME = re.compile(rb"[a-z0-9][a-z0-9._-]{0,62}")
_DNS_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(_DNS_LABEL + rb"(?:\." + _DNS_LABEL + rb")*")
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(_OCTET + rb"(?:\." + _OCTET + rb"){3}")
_PORT = re.compile(rb"[1-9][0-9]{0,4}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(rb"(?:[\x21-\x7e](?:[\x20\x09]*[\x21-\x7e])*)?")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) ([\x20-\x7e]{0,64})")
_FORBIDDEN_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"upgrade"})


class Kind(enum.Enum):
    """What a CONNECT target names."""

    SERVICE = "service"
    ADDRESS = "address"


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed target: a service ``name``, or a ``host`` and ``port``."""

    kind: Kind
    name: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind is Kind.SERVICE:
            return self.name
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _parse_target_bytes(raw: bytes) -> Target | None:
    if b":" not in raw:
        if _NAME.fullmatch(raw) and raw not in (b".", b".."):
            return Target(Kind.SERVICE, name=raw.decode("ascii"))
        return None
    host, _, port = raw.rpartition(b":")
    if not _PORT.fullmatch(port) or not 0 < int(port) <= 65535:
        return None
    if host.startswith(b"[") and host.endswith(b"]"):
        inner = host[1:-1]
        if not re.fullmatch(rb"[0-9A-Fa-f:.]{2,45}", inner):
            return None
        try:
            addr = ipaddress.IPv6Address(inner.decode("ascii"))
        except ValueError:
            return None
        return Target(Kind.ADDRESS, host=str(addr), port=int(port))
    if _IPV4.fullmatch(host) or (len(host) <= 253 and _DNS.fullmatch(host) and not host.rpartition(b".")[2].isdigit()):
        # A DNS name whose last label is numeric (``01.2.3.4``, ``1.2.3``) is refused:
        # resolvers read those as (octal, short) IPv4 forms.
        return Target(Kind.ADDRESS, host=host.decode("ascii"), port=int(port))
    return None


def parse_target(text: str) -> Target:
    """Parse a CONNECT target exactly; raise :class:`LocalProtocolError` if invalid."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raw = b""
    target = _parse_target_bytes(raw)
    if target is None or str(target) != text:
        raise LocalProtocolError(f"invalid connect target {text[:80]!r}")
    return target


@dataclasses.dataclass(frozen=True)
class ConnectRequest:
    """The event a server agent gets: the target and the headers (names lower-case)."""

    target: Target
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        key = name.lower()
        for k, v in self.headers:
            if k == key:
                return v
        return None

    @property
    def source(self) -> str | None:
        """The ``Tapproof-Source`` header: the original client ``ip:port``."""
        return self.header("tapproof-source")

    @property
    def request_id(self) -> str | None:
        """The ``Tapproof-Request-Id`` header."""
        return self.header("tapproof-request-id")


@dataclasses.dataclass(frozen=True)
class ConnectResponse:
    """The event a client agent gets: the status and its reason phrase."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """True for ``200``: the tunnel is open."""
        return self.status == 200


class _Head:
    """Accumulates one CRLF-terminated head with strict limits (shared by both machines)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already checked for line ends
        self._lines = 0
        self.leftover = b""

    def feed(self, data: bytes) -> list[bytes] | None:
        """Add ``data``; return the head's lines (without CRLF) once complete."""
        buf = self._buf
        buf += data
        i = self._scanned
        while True:
            nl = buf.find(b"\n", i)
            if nl < 0:
                break
            if nl == 0 or buf[nl - 1] != 0x0D:
                raise RemoteProtocolError("bare LF in preamble (CRLF only)")
            self._lines += 1
            if self._lines == 1 and nl - 1 > MAX_LINE_BYTES:
                raise RemoteProtocolError("first line of preamble too long")
            if self._lines > MAX_HEADERS + 2:
                raise RemoteProtocolError("too many headers in preamble")
            if nl + 1 > MAX_HEAD_BYTES:
                raise RemoteProtocolError("preamble too long")
            if nl == 1 or (nl >= 3 and buf[nl - 3 : nl + 1] == b"\r\n\r\n"):
                head = bytes(buf[: nl - 1])
                self.leftover = bytes(buf[nl + 1 :])
                buf.clear()
                lines = head.split(b"\r\n")
                if lines[-1] == b"":
                    lines.pop()
                if any(b"\r" in line for line in lines):
                    raise RemoteProtocolError("bare CR in preamble")
                return lines
            i = nl + 1
        self._scanned = len(buf)
        if self._lines == 0 and len(buf) > MAX_LINE_BYTES + 2:
            raise RemoteProtocolError("first line of preamble too long")
        if len(buf) > MAX_HEAD_BYTES:
            raise RemoteProtocolError("preamble too long")
        return None


def _parse_headers(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    if len(lines) > MAX_HEADERS:
        raise RemoteProtocolError("too many headers in preamble")
    out: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise RemoteProtocolError("obsolete line folding in preamble")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise RemoteProtocolError("malformed header line in preamble")
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            raise RemoteProtocolError("invalid header value in preamble")
        lname = name.lower()
        if lname in _FORBIDDEN_HEADERS:
            raise RemoteProtocolError("header not allowed in tunnel preamble")
        out.append((lname.decode("ascii"), value.decode("ascii")))
    return tuple(out)


def _single(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    values = [v for k, v in headers if k == name]
    if len(values) > 1:
        raise RemoteProtocolError(f"duplicate {name} header in preamble")
    return values[0] if values else None


class _State(enum.Enum):
    HEAD = "head"
    DONE = "done"
    ERROR = "error"


class ServerPreamble:
    """The server agent's side: feed request bytes, get one :class:`ConnectRequest`."""

    def __init__(self) -> None:
        self._head = _Head()
        self._state = _State.HEAD
        self._request: ConnectRequest | None = None
        self._responded = False

    @property
    def leftover(self) -> bytes:
        """Bytes received after the request's blank line (the client's first payload)."""
        return self._head.leftover

    def feed(self, data: bytes) -> ConnectRequest | None:
        """Feed bytes; return the request once complete, else None.

        Raises :class:`RemoteProtocolError` if the bytes break the grammar or a
        limit, and :class:`LocalProtocolError` if fed after the event or an error.
        """
        if self._state is not _State.HEAD:
            raise LocalProtocolError(f"preamble already {self._state.value}")
        try:
            lines = self._head.feed(data)
            if lines is None:
                return None
            self._request = self._parse(lines)
        except RemoteProtocolError:
            self._state = _State.ERROR
            raise
        self._state = _State.DONE
        return self._request

    def feed_eof(self) -> None:
        """The peer closed: an error unless the request is complete."""
        if self._state is _State.HEAD:
            self._state = _State.ERROR
            raise RemoteProtocolError("eof before end of connect preamble")

    @staticmethod
    def _parse(lines: list[bytes]) -> ConnectRequest:
        if not lines:
            raise RemoteProtocolError("empty preamble")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] != b"HTTP/1.1":
            raise RemoteProtocolError("request line is not 'CONNECT <target> HTTP/1.1'")
        target = _parse_target_bytes(parts[1])
        if target is None or str(target).encode("ascii") != parts[1]:
            raise RemoteProtocolError("invalid connect target")
        headers = _parse_headers(lines[1:])
        host = _single(headers, "host")
        if host != str(target):
            raise RemoteProtocolError("host header missing or not equal to the target")
        source = _single(headers, "tapproof-source")
        if source is not None:
            parsed = _parse_target_bytes(source.encode("ascii"))
            if parsed is None or parsed.kind is not Kind.ADDRESS or str(parsed) != source:
                raise RemoteProtocolError("invalid tapproof-source header")
        rid = _single(headers, "tapproof-request-id")
        if rid is not None and not _REQUEST_ID.fullmatch(rid.encode("ascii")):
            raise RemoteProtocolError("invalid tapproof-request-id header")
        return ConnectRequest(target, headers)

    def respond(self, status: int) -> bytes:
        """The response bytes for ``status`` (200, 403, 502; or 400 after a bad request)."""
        if self._responded:
            raise LocalProtocolError("already responded")
        if status not in REASONS:
            raise LocalProtocolError(f"status {status} is not one a server agent sends")
        if self._state is _State.HEAD or (self._state is _State.ERROR) != (status == 400):
            raise LocalProtocolError(f"status {status} does not fit state {self._state.value}")
        self._responded = True
        extra = b"" if status == 200 else b"Connection: close\r\n"
        return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, REASONS[status].encode("ascii"), extra)


class ClientPreamble:
    """The client agent's side: build the request; feed response bytes, get a response event."""

    def __init__(self, target: str, *, source: str | None = None, request_id: str | None = None) -> None:
        self.target = parse_target(target)
        if source is not None:
            parsed = parse_target(source)
            if parsed.kind is not Kind.ADDRESS:
                raise LocalProtocolError("source must be host:port")
        if request_id is not None and not _REQUEST_ID.fullmatch(request_id.encode("ascii", "replace")):
            raise LocalProtocolError("request id must be 1-64 characters of [A-Za-z0-9._-]")
        self._source = source
        self._request_id = request_id
        self._head = _Head()
        self._state = _State.HEAD

    def request(self) -> bytes:
        """The request bytes to send right after the TLS handshake."""
        t = str(self.target).encode("ascii")
        out = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (t, t)
        if self._source is not None:
            out += b"Tapproof-Source: %s\r\n" % self._source.encode("ascii")
        if self._request_id is not None:
            out += b"Tapproof-Request-Id: %s\r\n" % self._request_id.encode("ascii")
        return out + b"\r\n"

    @property
    def leftover(self) -> bytes:
        """Bytes received after the response's blank line (the service's first bytes)."""
        return self._head.leftover

    def feed(self, data: bytes) -> ConnectResponse | None:
        """Feed response bytes; return the response once complete, else None."""
        if self._state is not _State.HEAD:
            raise LocalProtocolError(f"preamble already {self._state.value}")
        try:
            lines = self._head.feed(data)
            if lines is None:
                return None
            if not lines:
                raise RemoteProtocolError("empty response")
            m = _STATUS_LINE.fullmatch(lines[0])
            if m is None:
                raise RemoteProtocolError("status line is not 'HTTP/1.1 <3 digits> <reason>'")
            headers = _parse_headers(lines[1:])
        except RemoteProtocolError:
            self._state = _State.ERROR
            raise
        self._state = _State.DONE
        return ConnectResponse(int(m.group(1)), m.group(2).decode("ascii"), headers)

    def feed_eof(self) -> None:
        """The peer closed: an error unless the response is complete."""
        if self._state is _State.HEAD:
            self._state = _State.ERROR
            raise RemoteProtocolError("eof before end of connect response")
