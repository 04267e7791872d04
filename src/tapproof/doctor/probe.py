"""The doctor's I/O: read facts from files, sockets, the admin endpoint and iptables.

Every function returns facts (or an error string) and never raises for a
condition the doctor reports on; the judging is in :mod:`tapproof.doctor.checks`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from cryptography import x509
from OpenSSL import SSL

from tapproof import identity
from tapproof.control.client import _roundtrip
from tapproof.doctor.checks import ApiProbe, Validity
from tapproof.errors import PeerRejected, PKIError, TapproofError
from tapproof.pki import certs
from tapproof.tls.credentials import TrustBundle
from tapproof.tls.peer import check_peer
from tapproof.tls.stream import TLSStream
from tapproof.units import parse_hostport

__all__ = ["admin_get", "file_age", "iptables_nat", "probe_api", "tcp_accepts", "utcnow", "validity"]


def utcnow() -> dt.datetime:
    """The host's wall clock (UTC)."""
    return dt.datetime.now(dt.UTC)


def validity(cert: x509.Certificate) -> Validity:
    """The validity window of ``cert``; ``issued_at`` without the issuer's backdate."""
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    issued = nb + certs.BACKDATE if na - nb > certs.BACKDATE else nb
    return Validity(cert.subject.rfc4514_string(), nb, na, issued)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _open(address: str, ctx: SSL.Context, timeout: float) -> tuple[TLSStream | None, str, str]:
    """TCP then TLS: (stream, '', '') or (None, stage, error)."""
    try:
        host, port = parse_hostport(address, what="server address")
    except TapproofError as exc:
        return None, "connect", str(exc)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return None, "connect", _describe(exc)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = TLSStream.client(ctx, sock)
    try:
        stream.handshake(time.monotonic() + timeout)
    except (TapproofError, OSError, SSL.Error) as exc:
        stream.abort()
        return None, "tls", _describe(exc)
    return stream, "", ""


def _get(stream: TLSStream, address: str, path: str, timeout: float) -> tuple[int, dict[str, str], Any]:
    try:
        return _roundtrip(stream, "GET", path, None, (), address, timeout)
    finally:
        stream.close(time.monotonic() + 1.0)


def _http_date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).astimezone(dt.UTC)
    except (TypeError, ValueError):
        return None


def _iso(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def probe_api(
    address: str,
    trust_domain: str,
    ctx_factory: Callable[[], SSL.Context],
    *,
    timeout: float = 5.0,
    now: Callable[[], dt.datetime] = utcnow,
) -> ApiProbe:
    """Call ``GET /v1/healthz`` then ``GET /v1/bundle`` on one server with the given client context.

    Records how far it got, the negotiated group, the server's chain, the
    server's time (body and Date header) with our clock around the request,
    and the root fingerprints it publishes.
    """
    stream, stage, error = _open(address, ctx_factory(), timeout)
    if stream is None:
        return ApiProbe(address, stage, error)
    group = stream.group
    chain = tuple(validity(c) for c in stream.conn.get_peer_cert_chain(as_cryptography=True) or [])
    try:
        check_peer(
            stream,
            trust_domain=trust_domain,
            now=now(),
            usage="server",
            accept=lambda s: s.kind is identity.Kind.SERVER,
        )
    except PeerRejected as exc:
        stream.abort()
        return ApiProbe(address, "identity", _describe(exc), group=group, chain=chain)
    before = now()
    try:
        status, headers, body = _get(stream, address, "/v1/healthz", timeout)
    except (TapproofError, OSError, SSL.Error) as exc:
        return ApiProbe(address, "http", _describe(exc), group=group, chain=chain)
    after = now()
    server_time = _iso(body.get("time")) if isinstance(body, dict) and status == 200 else None
    return ApiProbe(
        address,
        "done",
        status=status,
        group=group,
        local_before=before,
        local_after=after,
        server_time=server_time,
        server_date=_http_date(headers.get("date")),
        chain=chain,
        bundle=_bundle(address, ctx_factory, timeout),
    )


def _bundle(address: str, ctx_factory: Callable[[], SSL.Context], timeout: float) -> tuple[str, ...] | None:
    """The root fingerprints ``address`` publishes (None when it cannot say)."""
    stream, _stage, _error = _open(address, ctx_factory(), timeout)
    if stream is None:
        return None
    try:
        status, _h, body = _get(stream, address, "/v1/bundle", timeout)
        if status != 200 or not isinstance(body, dict):
            return None
        return TrustBundle.from_pem(str(body["bundle"]).encode()).fingerprints
    except (TapproofError, OSError, SSL.Error, KeyError, PKIError):
        return None


def admin_get(address: str, path: str, timeout: float = 5.0) -> tuple[int, Any, str]:
    """GET ``http://address/path`` on an agent's admin endpoint: (status, JSON body, error)."""
    url = f"http://{address}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, raw = int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = int(exc.code), exc.read()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, None, _describe(reason) if isinstance(reason, BaseException) else str(reason)
    try:
        return status, json.loads(raw), ""
    except ValueError:
        return status, None, ""


def tcp_accepts(address: str, timeout: float = 3.0) -> str:
    """'' when a TCP connection to ``address`` succeeds, else why not (wildcards are tried on loopback)."""
    try:
        host, port = parse_hostport(address, what="address")
    except TapproofError as exc:
        return str(exc)
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as exc:
        return _describe(exc)


def iptables_nat() -> tuple[str | None, str]:
    """``iptables -t nat -S`` output, or (None, why it cannot be read)."""
    tool = shutil.which("iptables")
    if tool is None:
        return None, "iptables is not installed"
    if os.geteuid() != 0:
        return None, "not root"
    try:
        proc = subprocess.run(
            [tool, "-w", "5", "-t", "nat", "-S"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, _describe(exc)
    if proc.returncode != 0:
        return None, proc.stderr.strip()[:200] or f"iptables exited {proc.returncode}"
    return proc.stdout, ""


def file_age(path: os.PathLike[str] | str, now: dt.datetime) -> dt.timedelta | None:
    """How long ago ``path`` was last written (None if it cannot be read)."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return None
    return now - dt.datetime.fromtimestamp(mtime, dt.UTC)
