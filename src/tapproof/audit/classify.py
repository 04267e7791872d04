"""Protocol detection from the first bytes of each direction of a TCP flow.

Hand-written on purpose: what matters here is *which* protocol a flow speaks
and whether it is encrypted, decided from a few hundred bytes that may be cut
anywhere; full protocol parsers would either want whole messages or raise on
partial ones. ``classify`` never raises: any bytes give a
:class:`Classification` (``done=False`` while more bytes could change it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from tapproof.audit import tls
from tapproof.audit.errors import TLSParseError

__all__ = ["Classification", "classify", "entropy"]

_SAMPLE = 2048  # bytes per direction that unknown-flow heuristics look at
_MIN_UNKNOWN = 64  # fewer bytes than this: "unknown"


@dataclass(slots=True)
class Classification:
    """The classifier's answer for one flow."""

    protocol: str
    done: bool = True
    tls: tls.TLSInfo | None = None
    upgraded_from: str | None = None  # e.g. "postgresql" for SSLRequest then TLS
    ssh_kex: str | None = None
    ssh_version: str | None = None
    midstream: bool = False  # the start of the flow was not seen
    evidence: str = ""  # for plaintext: which direction and offset the sample is from
    sample: bytes = b""  # the bytes that show why (redacted by the report)
    swap: bool = False  # client/server were guessed the wrong way round
    need_client: int = 0  # re-run when the client stream reaches this many bytes
    need_server: int = 0


# --------------------------------------------------------------------------- helpers


def entropy(data: bytes) -> float:
    """Shannon entropy in bits per byte."""
    n = len(data)
    if not n:
        return 0.0
    counts = [0] * 256
    for b in data:
        counts[b] += 1
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def _random_entropy(n: int) -> float:
    """Expected entropy of ``n`` uniformly random bytes (Miller-Madow bias)."""
    return 8.0 - 255.0 / (2.0 * n * math.log(2))


_PRINTABLE = frozenset(b"\t\r\n" + bytes(range(32, 127)))


def _printable_ratio(data: bytes) -> float:
    return sum(1 for b in data if b in _PRINTABLE) / len(data) if data else 0.0


_HTTP_REQ = re.compile(rb"^(GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH|CONNECT|TRACE|PROPFIND) [^\r\n ]{1,8000} HTTP/[0-9]")
_HTTP_PREFIX = re.compile(rb"^(GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH|CONNECT|TRACE|PROPFIND) /")
_RESP_CMD = re.compile(rb"^\*[1-9][0-9]{0,5}\r\n\$[0-9]{1,9}\r\n[A-Za-z]{2,20}")
_RESP_REPLY = re.compile(rb"^(\+[A-Za-z]|-ERR|-WRONGTYPE|-NOAUTH|:-?[0-9]+\r\n|\$(-1|[0-9]+)\r\n)")
_REDIS_INLINE = re.compile(rb"^(PING|AUTH|HELLO|INFO|SELECT|QUIT|CLIENT) ?[^\r\n]*\r\n", re.IGNORECASE)
_MEMCACHED = re.compile(
    rb"^(get|gets|set|add|replace|append|prepend|cas|delete|incr|decr|touch|gat|gats|"
    rb"mg|ms|md|ma|mn|me) [^\r\n]*\r\n|^(stats|version|flush_all|verbosity|quit)( [^\r\n]*)?\r\n"
)
_MEMCACHED_REPLY = re.compile(rb"^(VALUE |STORED\r\n|END\r\n|DELETED\r\n|NOT_FOUND\r\n|VERSION |STAT )")
_SMTP_CMD = re.compile(rb"^(EHLO|HELO|LHLO) ", re.IGNORECASE)
_FTP_CMD = re.compile(rb"^(USER |AUTH (TLS|SSL)|FEAT\r\n|SYST\r\n|OPTS |PASS )", re.IGNORECASE)
_IMAP_BANNER = re.compile(rb"^\* (OK|PREAUTH) ")
_POP3_BANNER = re.compile(rb"^\+OK ")
_STARTTLS = re.compile(rb"(^|\n)(STARTTLS|AUTH TLS|AUTH SSL|STLS|[A-Za-z0-9]+ STARTTLS)\r?\n", re.IGNORECASE)
_PG_SSLREQ = bytes.fromhex("0000000804d2162f")
_PG_GSSREQ = bytes.fromhex("0000000804d21630")
_PG_CANCEL = bytes.fromhex("0000001004d2162e")


def _tls_of(c: bytes, s: bytes) -> tls.TLSInfo | None:
    """Parse TLS from both directions, or None if they are not TLS."""
    try:
        return tls.parse(c, s)
    except TLSParseError:
        return None


def _tls_result(c: bytes, s: bytes, *, final: bool, upgraded_from: str | None = None) -> Classification | None:
    info = _tls_of(c, s)
    if info is None:
        return None
    if not info.client_hello and not info.server_hello and not (info.app_data or c or s):
        return None
    done = info.server_done or info.alert is not None or final
    return Classification(
        "tls",
        done=done,
        tls=info,
        upgraded_from=upgraded_from,
        need_client=0 if done else info.need_client,
        need_server=0 if done else max(info.need_server, len(s) + 1),
    )


def _find_tls_start(data: bytes, hs_type: int) -> int:
    """Offset of a TLS handshake record of ``hs_type`` at a line start in ``data``, or -1."""
    pos = data.find(b"\x16\x03")
    while pos >= 0:
        if (pos == 0 or data[pos - 1] == 0x0A) and len(data) > pos + 5 and data[pos + 5] == hs_type:
            return pos
        pos = data.find(b"\x16\x03", pos + 1)
    return -1


# --------------------------------------------------------------------------- protocols


def _is_tls_start(data: bytes, hs_type: int) -> bool:
    return tls.looks_like_tls(data) and data[0] == 22 and (len(data) < 6 or data[5] == hs_type)


def _ssh(c: bytes, s: bytes, final: bool) -> Classification | None:
    if not (c.startswith(b"SSH-") or s.startswith(b"SSH-")):
        return None
    out = Classification("ssh")
    banner = (s if s.startswith(b"SSH-") else c).split(b"\r\n", 1)[0][:64]
    out.ssh_version = banner.decode("ascii", "replace")
    ck, sk = _ssh_kex_list(c), _ssh_kex_list(s)
    if ck is not None and sk is not None:
        out.ssh_kex = next((k for k in ck if k in sk), "none")
    elif not final:
        out.done = False
        out.need_client = len(c) + 1 if ck is None else 0
        out.need_server = len(s) + 1 if sk is None else 0
    return out


def _ssh_kex_list(data: bytes) -> list[str] | None:
    """The kex_algorithms name-list of the first KEXINIT after the banner, or None."""
    end = data.find(b"\n")
    if end < 0:
        return None
    pkt = data[end + 1 :]
    if len(pkt) < 6 + 16 + 4 or pkt[5] != 20:  # SSH_MSG_KEXINIT
        return None
    n = int.from_bytes(pkt[22:26], "big")
    if n > 4096 or len(pkt) < 26 + n:
        return None
    return pkt[26 : 26 + n].decode("ascii", "replace").split(",")


def _postgres(c: bytes, s: bytes, final: bool) -> Classification | None:
    if c.startswith((_PG_SSLREQ, _PG_GSSREQ)):
        if not s:
            return Classification("postgresql", done=final, need_server=1)
        if s[:1] == b"S" and c.startswith(_PG_SSLREQ):
            res = _tls_result(c[8:], s[1:], final=final, upgraded_from="postgresql")
            if res is not None:
                if res.need_client:
                    res.need_client += 8
                if res.need_server:
                    res.need_server += 1
                return res
        if s[:1] == b"G":
            return Classification("gssapi", upgraded_from="postgresql")
        if s[:1] == b"N":
            rest = _postgres(c[8:], s[1:], final)
            if rest is not None:
                rest.upgraded_from = None
                return rest
            return Classification("postgresql", evidence="client", sample=c[:8])
        return None
    if c.startswith(_PG_CANCEL):
        return Classification("postgresql", evidence="client", sample=c[:8])
    if len(c) >= 8 and c[4:8] in (b"\x00\x03\x00\x00", b"\x00\x02\x00\x00"):
        length = int.from_bytes(c[:4], "big")
        if 8 < length < 10000 and (b"user\x00" in c[8:length] or b"database\x00" in c[8:length]):
            return Classification("postgresql", evidence="client", sample=c[:length][:40])
    return None


def _mysql(c: bytes, s: bytes, final: bool) -> Classification | None:
    if len(s) < 8 or s[3] != 0 or s[4] != 10:
        return None
    plen = int.from_bytes(s[:3], "little")
    nul = s.find(b"\x00", 5, 5 + 64)
    if not (20 < plen < 1024) or nul < 0 or not s[5:nul].replace(b".", b"").replace(b"-", b"").isalnum():
        return None
    if len(c) < 4:
        return Classification("mysql", done=final, need_client=4, evidence="server", sample=s[5:nul])
    clen = int.from_bytes(c[:3], "little")
    if len(c) >= 8 and clen == 32 and int.from_bytes(c[4:6], "little") & 0x0800:  # CLIENT_SSL
        res = _tls_result(c[36:], s[4 + plen :], final=final, upgraded_from="mysql")
        if res is not None:
            res.need_client = res.need_client + 36 if res.need_client else 0
            res.need_server = res.need_server + 4 + plen if res.need_server else 0
            return res
    return Classification("mysql", evidence="server", sample=s[4 : 4 + min(plen, 24)])


def _text_with_starttls(c: bytes, s: bytes, name: str, final: bool) -> Classification:
    """SMTP/FTP/IMAP/POP3: plaintext unless a STARTTLS-style upgrade follows."""
    if _STARTTLS.search(c[:_SAMPLE]):
        ci, si = _find_tls_start(c, 1), _find_tls_start(s, 2)
        if ci >= 0:
            res = _tls_result(c[ci:], s[si:] if si >= 0 else b"", final=final, upgraded_from=name)
            if res is not None:
                if res.need_client:
                    res.need_client += ci
                if res.need_server:
                    res.need_server = res.need_server + si if si >= 0 else len(s) + 1
                return res
        if not final:
            return Classification(name, done=False, need_client=len(c) + 1, need_server=len(s) + 1)
    done = final or len(c) >= _SAMPLE or len(s) >= 4 * _SAMPLE
    side, data = ("client", c) if c else ("server", s)
    return Classification(
        name, done=done, evidence=side, sample=data[:48], need_client=len(c) + 1, need_server=len(s) + 1
    )


def _banner_protocol(c: bytes, s: bytes, final: bool) -> Classification | None:
    if s.startswith((b"220 ", b"220-")):
        first = s.split(b"\n", 1)[0].upper()
        if _SMTP_CMD.match(c) or (not _FTP_CMD.match(c) and b"SMTP" in first):
            return _text_with_starttls(c, s, "smtp", final)
        if _FTP_CMD.match(c) or b"FTP" in first:
            return _text_with_starttls(c, s, "ftp", final)
        if not c and not final:
            return Classification("smtp", done=False, need_client=1, need_server=len(s) + 1)
    if _IMAP_BANNER.match(s):
        return _text_with_starttls(c, s, "imap", final)
    if _POP3_BANNER.match(s) and (not c or re.match(rb"^(USER|CAPA|STLS|APOP|AUTH)", c, re.I)):
        return _text_with_starttls(c, s, "pop3", final)
    return None


def _http(c: bytes, s: bytes, final: bool) -> Classification | None:
    if c.startswith(b"PRI * HTTP/2.0\r\n"):
        return Classification("http2", evidence="client", sample=c[:16])
    if _HTTP_REQ.match(c) or (len(c) < 64 and _HTTP_PREFIX.match(c)):
        if c.startswith(b"CONNECT "):  # a proxy tunnel: TLS may follow the 200
            head = s.find(b"\r\n\r\n")
            if s.startswith(b"HTTP/1.") and s[9:12] == b"200" and head >= 0:
                cstart = c.find(b"\r\n\r\n")
                res = _tls_result(c[cstart + 4 :], s[head + 4 :], final=final, upgraded_from="http-connect")
                if res is not None and cstart >= 0 and ((res.tls and res.tls.client_hello) or final):
                    res.need_client = res.need_client + cstart + 4 if res.need_client else 0
                    res.need_server = res.need_server + head + 4 if res.need_server else 0
                    return res
            if not final:
                return Classification("http", done=False, need_client=len(c) + 1, need_server=len(s) + 1)
        end = c.find(b" ")
        return Classification("http", evidence="client", sample=c[: max(end, 0) + 48])
    if s.startswith(b"HTTP/1.") and s[8:9] == b" " and s[9:12].isdigit():
        return Classification("http", evidence="server", sample=s[:48])
    return None


def _redis(c: bytes, s: bytes) -> Classification | None:
    if _RESP_CMD.match(c) or (_REDIS_INLINE.match(c) and (not s or _RESP_REPLY.match(s))):
        return Classification("redis", evidence="client", sample=c[:48])
    return None


def _memcached(c: bytes, s: bytes) -> Classification | None:
    if _MEMCACHED.match(c) and (not s or _MEMCACHED_REPLY.match(s) or s.startswith(b"ERROR")):
        return Classification("memcached", evidence="client", sample=c[:48])
    if len(c) >= 24 and c[0] == 0x80 and (not s or s[0] == 0x81):  # binary protocol
        keylen = int.from_bytes(c[2:4], "big")
        total = int.from_bytes(c[8:12], "big")
        if c[4] <= total and keylen <= total < 1 << 20 and c[5] == 0:
            return Classification("memcached", evidence="client", sample=c[:24])
    return None


def _dns(c: bytes, s: bytes, port: int) -> Classification | None:
    if len(c) < 14:
        return None
    length = int.from_bytes(c[:2], "big")
    flags = int.from_bytes(c[4:6], "big")
    qd, an, ns = (int.from_bytes(c[i : i + 2], "big") for i in (6, 8, 10))
    if not (12 <= length <= 65535 and flags & 0x8000 == 0 and (flags >> 11) & 0xF in (0, 4, 5)):
        return None
    if qd != 1 or an > 0 or ns > 0:
        return None
    pos, labels = 14, 0
    while pos < min(len(c), 2 + length):
        n = c[pos]
        if n == 0:
            return Classification("dns-tcp", evidence="client", sample=c[:40]) if labels else None
        if n > 63:
            return None
        pos += 1 + n
        labels += 1
    return Classification("dns-tcp", evidence="client", sample=c[:40]) if port == 53 else None


def _unknown(c: bytes, s: bytes, final: bool, midstream: bool) -> Classification:
    cs, ss = c[:_SAMPLE], s[:_SAMPLE]
    total = len(cs) + len(ss)
    if total < _MIN_UNKNOWN or (not final and len(cs) < _SAMPLE and len(ss) < _SAMPLE):
        return Classification(
            "unknown",
            done=final,
            midstream=midstream,
            need_client=min(len(c) + 1, _SAMPLE),
            need_server=min(len(s) + 1, _SAMPLE),
        )
    sample = cs + ss
    if _printable_ratio(sample) >= 0.95:
        side, data = ("client", c) if cs else ("server", s)
        return Classification("unknown-plaintext", midstream=midstream, evidence=side, sample=data[:48])
    # Ciphertext is indistinguishable from random: anything clearly below the
    # entropy of random bytes of the same length is not encrypted (per direction).
    low = [d for d in (cs, ss) if len(d) >= 256 and entropy(d) < _random_entropy(len(d)) - 1.0]
    if low:
        side = "client" if low[0] is cs else "server"
        return Classification("unknown-plaintext", midstream=midstream, evidence=side, sample=low[0][:48])
    if all(entropy(d) >= _random_entropy(len(d)) - 0.5 for d in (cs, ss) if len(d) >= _MIN_UNKNOWN):
        return Classification("unknown-encrypted", midstream=midstream)
    return Classification("unknown", midstream=midstream)


def _tls_resync(data: bytes) -> bool:
    """True if ``data`` holds a chain of at least two TLS records (found from any offset)."""
    pos = data.find(b"\x17\x03\x03")
    while 0 <= pos < _SAMPLE * 4:
        n, at = 0, pos
        while tls.looks_like_tls(data[at : at + 5]) and at + 5 <= len(data):
            at += 5 + ((data[at + 3] << 8) | data[at + 4])
            n += 1
            if (n >= 2 and at <= len(data)) or at == len(data):
                return True
        if n == 1 and at > len(data) and pos == 0:
            return True  # one record that runs past what we hold, starting at the start
        pos = data.find(b"\x17\x03\x03", pos + 1)
    return False


# --------------------------------------------------------------------------- entry point


def classify(
    client: bytes, server: bytes, *, port: int = 0, final: bool = False, midstream: bool = False
) -> Classification:
    """Classify a flow from the first bytes of each direction.

    ``port`` is the server port (a hint only for DNS), ``final`` says no more
    bytes will come (decide now), ``midstream`` says the flow's start was not
    captured. Never raises.
    """
    c, s = client, server
    if not c and not s:
        return Classification("unknown", done=final, midstream=midstream, need_client=1, need_server=1)
    # TLS directly, either way round (the first packet seen is not always the client's).
    if _is_tls_start(c, 1) or _is_tls_start(s, 2):
        res = _tls_result(c, s, final=final)
        if res is not None:
            return res
    if _is_tls_start(s, 1) and not _is_tls_start(c, 1):
        res = _tls_result(s, c, final=final)
        if res is not None:
            res.swap = True
            res.need_client, res.need_server = res.need_server, res.need_client
            return res
    checks: tuple[Callable[[], Classification | None], ...] = (
        lambda: _ssh(c, s, final),
        lambda: _postgres(c, s, final),
        lambda: _http(c, s, final),
        lambda: _redis(c, s),
        lambda: _banner_protocol(c, s, final),
        lambda: _mysql(c, s, final),
        lambda: _memcached(c, s),
        lambda: _dns(c, s, port),
    )
    for check in checks:
        try:
            found = check()
        except (IndexError, ValueError):  # a heuristic read past what it checked: not a match
            found = None
        if found is not None:
            found.midstream = midstream
            return found
    # Mid-stream TLS: a run of well-formed records without the handshake.
    if midstream and any(_tls_resync(d) for d in (c, s)):
        return Classification("tls", tls=tls.TLSInfo(app_data=True), midstream=True)
    return _unknown(c, s, final, midstream)
